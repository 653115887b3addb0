#!/usr/bin/env python3
"""wasmpool benchmarks, side by side with `wasmtime serve` 48.0.8 and a native
hyper server, in one run on one machine. Run through benches/run.sh.

Every throughput figure is a median of interleaved rounds (each server in
turn, several times), reported as a ratio with the A/A spread (wasmpool
measured twice per round against itself) beside it: these machines are
shared and noisy, and only ratios from one run mean anything.

Writes target/bench/results.json, docs/benchmarks.md and
docs/benchmarks.svg.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("WASMPOOL_BENCH_TOOLS", "/var/cache/wasmpool-bench"))
WASMTIME = TOOLS / "wasmtime-48.0.8/bin/wasmtime"
# wasmpool's default request timeout, given to `wasmtime serve` as -W timeout
# for the equal-protection comparison.
REQUEST_TIMEOUT = "30s"
OHA = TOOLS / "oha/bin/oha"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


class Server:
    """A server process on a loopback port."""

    def __init__(self, name, argv, port, env=None, metrics_port=None):
        self.name, self.argv, self.port = name, argv, port
        self.metrics_port = metrics_port
        self.out = tempfile.TemporaryFile()
        # wasmpool at its defaults, logging included: the access log goes
        # to stderr, here a file (as under systemd's LogsDirectory=).
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=self.out, env=e)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                self.out.seek(0)
                raise SystemExit(f"{name} exited: {self.out.read().decode(errors='replace')[-2000:]}")
            try:
                if http_get(self.url + "/")[0] == 200:
                    break
            except Exception:
                pass
            if time.time() > deadline:
                raise SystemExit(f"{name} did not start")
            time.sleep(0.05)

    def rss_kib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def metric(self, name):
        _, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
        raise KeyError(name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wrk(url, seconds, conns, path="/", headers=()):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
         *[a for h in headers for a in ("-H", h)], url + path],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(map(int, errs.groups())) if errs else 0,
    }


def wasmpool_cmd(bin_, guest, port, args, cache, metrics_port=None):
    argv = [str(bin_), "serve", str(guest), "--listen", f"127.0.0.1:{port}",
            "--cache-dir", str(cache), *args]
    if metrics_port:
        argv += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    return argv


def wasmtime_cmd(guest, port, args, cli=False):
    # The WAT p3 guest uses component-model async builtins that wasmpool's
    # engine enables and `wasmtime serve` needs asked for.
    argv = [str(WASMTIME), "serve", "--addr", f"127.0.0.1:{port}",
            "-Wcomponent-model-async", "-Wcomponent-model-more-async-builtins", *args]
    if cli:
        argv.append("-Scli")
    return argv + [str(guest)]


# name, guest, path, wasmpool flags == wasmtime serve flags, connections,
# whether the native server takes part, whether the guest needs -Scli.
SCENARIOS = [
    ("p2 hello, fresh instance per request", "p2_hello.wasm", "/",
     ["--max-instance-reuse-count", "1"], 16, True, False),
    ("p2 hello, reuse 128", "p2_hello.wasm", "/",
     ["--max-instance-reuse-count", "128"], 16, True, False),
    ("p3 hello, defaults (reuse 128, 16 concurrent)", "p3_suite.wasm", "/",
     [], 16, True, False),
    ("p3 hello, serial reuse (128, 1 at a time)", "p3_suite.wasm", "/",
     ["--max-instance-reuse-count", "128", "--max-instance-concurrent-reuse-count", "1"], 16, True, False),
    ("p3 I/O-bound, 40 ms sleep, defaults", "p3_suite.wasm", "/sleep/40",
     [], 64, False, False),
    ("Python p2, fresh instance per request", "py_p2.wasm", "/",
     ["--max-instance-reuse-count", "1"], 16, False, True),
    ("Python p2, reuse 128", "py_p2.wasm", "/",
     ["--max-instance-reuse-count", "128"], 16, False, True),
    ("Python p3, defaults", "py_p3.wasm", "/",
     [], 16, False, True),
    # benches/js: one Hono app, built as a StarlingMonkey fetch-event
    # handler (its instances answer one request) and as a component that
    # exports the incoming handler itself (reusable).
    ("JS (Hono) fetch-event, fresh instance per request", "js_fetch.wasm", "/",
     ["--max-instance-reuse-count", "1"], 16, False, True),
    ("JS (Hono) reusable, reuse 64", "js_reuse.wasm", "/",
     ["--max-instance-reuse-count", "64"], 16, False, True),
]


def throughput(bin_, guests, cache, rounds, seconds, native_bin, only=None):
    results = []
    for name, guest, path, flags, conns, with_native, cli in SCENARIOS:
        if only and not re.search(only, name):
            continue
        log(f"== {name}")
        servers = {}
        mport = free_port()
        p = free_port()
        servers["wasmpool"] = Server("wasmpool", wasmpool_cmd(bin_, guests / guest, p, flags, cache, mport), p, metrics_port=mport)
        p = free_port()
        servers["wasmtime"] = Server("wasmtime serve", wasmtime_cmd(guests / guest, p, flags, cli), p)
        # Equal protection: wasmpool's default 30 s request timeout relies on
        # epoch checks in the compiled code; `wasmtime serve` compiles them
        # (and can stop a spinning guest) only when given -W timeout.
        p = free_port()
        servers["wasmtime_timeout"] = Server(
            "wasmtime serve -W timeout", wasmtime_cmd(guests / guest, p, flags + [f"-Wtimeout={REQUEST_TIMEOUT}"], cli), p)
        if with_native:
            p = free_port()
            servers["native"] = Server("native", [str(native_bin), f"127.0.0.1:{p}"], p)
        for s in servers.values():  # warm-up
            wrk(s.url, 1, conns, path)
        rows = {k: [] for k in servers}
        rows["wasmpool_again"] = []
        errors = 0
        for r in range(rounds):
            order = ["wasmpool", "wasmtime", "wasmtime_timeout"] + (["native"] if with_native else []) + ["wasmpool_again"]
            for k in order:
                s = servers["wasmpool" if k == "wasmpool_again" else k]
                m = wrk(s.url, seconds, conns, path)
                rows[k].append(m["rps"])
                if k.startswith("wasmpool"):
                    errors += m["non2xx"] + m["socket_errors"]
            log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rows.items()))
        peak = servers["wasmpool"].metric("wasmpool_instances_peak")
        for s in servers.values():
            s.stop()
        wp = rows["wasmpool"]
        res = {
            "scenario": name, "guest": guest, "path": path, "flags": flags, "connections": conns,
            "rps": {k: statistics.median(v) for k, v in rows.items()},
            "rounds": rows,
            "vs_wasmtime": statistics.median(a / b for a, b in zip(wp, rows["wasmtime"])),
            "vs_wasmtime_timeout": statistics.median(a / b for a, b in zip(wp, rows["wasmtime_timeout"])),
            "aa": [min(b / a for a, b in zip(wp, rows["wasmpool_again"])),
                   max(b / a for a, b in zip(wp, rows["wasmpool_again"]))],
            "wasmpool_errors": errors,
            "wasmpool_peak_instances": peak,
        }
        if with_native:
            res["vs_native"] = statistics.median(a / b for a, b in zip(wp, rows["native"]))
            res["wasmtime_vs_native"] = statistics.median(a / b for a, b in zip(rows["wasmtime"], rows["native"]))
        results.append(res)
        log(f"  -> {res['vs_wasmtime']:.2f}x wasmtime serve, {res['vs_wasmtime_timeout']:.2f}x with -W timeout" + (f", {res['vs_native']:.2f}x native" if with_native else "")
            + f" (A/A {res['aa'][0]:.2f}..{res['aa'][1]:.2f})")
    return results


def io_peaks(bin_, guests, cache, runs=10, seconds=3, conns=64, sleep_ms=40):
    """The I/O-bound scenario's peak live instances over `runs` runs, each
    on a new wasmpool process (the peak is a process high-water mark)."""
    out = []
    for i in range(runs):
        p, mport = free_port(), free_port()
        s = Server("wasmpool", wasmpool_cmd(bin_, guests / "p3_suite.wasm", p, [], cache, mport), p,
                   metrics_port=mport)
        m = wrk(s.url, seconds, conns, f"/sleep/{sleep_ms}")
        out.append({"peak": s.metric("wasmpool_instances_peak"), "rps": m["rps"],
                    "errors": m["non2xx"] + m["socket_errors"]})
        s.stop()
        log(f"I/O-bound run {i + 1}: peak {out[-1]['peak']:.0f} instances, {m['rps']:.0f} req/s")
    return {"connections": conns, "sleep_ms": sleep_ms, "seconds": seconds, "runs": out}


def first_response_ms(start_proc, port, deadline_s=120):
    """Starts a process (start_proc()) and times until GET / answers 200."""
    t0 = time.perf_counter()
    proc = start_proc()
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data = c.recv(64)
                    if data.startswith(b"HTTP/1.1 200"):
                        return (time.perf_counter() - t0) * 1000
            except OSError:
                pass
            if time.perf_counter() - t0 > deadline_s:
                raise SystemExit("no first response")
            # (A refused connection costs microseconds; polling every
            # millisecond added half of one to each start on average.)
            time.sleep(0.00025)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def listening(port):
    """Whether something listens on 127.0.0.1:port (without connecting)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == want and f[3] == "0A":
            return True
    return False


def activated_first_response_ms(bin_, guest, cache, deadline_s=120):
    """Under systemd-socket-activate: from connecting to the listening
    socket to the first response; the connection starts wasmpool."""
    port = free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
         str(bin_), "serve", str(guest), "--cache-dir", str(cache)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, WASMPOOL_LOG="warn"))
    try:
        deadline = time.time() + 10
        while not listening(port):
            if time.time() > deadline:
                raise SystemExit("systemd-socket-activate did not listen")
            time.sleep(0.005)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = c.recv(64)
        assert data.startswith(b"HTTP/1.1 200"), data
        return (time.perf_counter() - t0) * 1000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def quartiles(samples):
    q = statistics.quantiles(samples, n=4)
    return [q[0], q[2]]


def cold_start(bin_, guests, reps, cached_reps):
    """Medians of `reps` starts that compile, and of `cached_reps` with the
    cache (a start is 10-40 ms, and this host's noise moves a few of them
    by half: more samples make the median hold still)."""
    out = []
    for guest in ["p2_hello.wasm", "py_p2.wasm"]:
        row = {"guest": guest}
        for label, keep in [("no cache", False), ("with cache", True)]:
            samples = []
            cache = Path(tempfile.mkdtemp(prefix="wasmpool-bench-cache."))
            if keep:  # fill it first
                port = free_port()
                first_response_ms(lambda: subprocess.Popen(
                    wasmpool_cmd(bin_, guests / guest, port, [], cache),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)
            for _ in range(cached_reps if keep else reps):
                if not keep:
                    shutil.rmtree(cache, ignore_errors=True)
                    cache.mkdir()
                port = free_port()
                samples.append(first_response_ms(lambda: subprocess.Popen(
                    wasmpool_cmd(bin_, guests / guest, port, [], cache),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=dict(os.environ, WASMPOOL_LOG="warn")), port))
            row[label] = statistics.median(samples)
            if keep:
                row["with cache quartiles"] = quartiles(samples)
                activated = [activated_first_response_ms(bin_, guests / guest, cache)
                             for _ in range(cached_reps)]
                row["socket activation, with cache"] = statistics.median(activated)
                row["socket activation quartiles"] = quartiles(activated)
            shutil.rmtree(cache, ignore_errors=True)
        log(f"cold start {guest}: {row}")
        out.append(row)
    return out


def memory(bin_, guests, cache, n=48):
    """RSS per live instance: n concurrent slow requests, one instance each."""
    out = []
    for guest in ["p2_suite.wasm", "p3_suite.wasm"]:
        port, mport = free_port(), free_port()
        s = Server("wasmpool", wasmpool_cmd(bin_, guests / guest, port, [
            "--max-instance-concurrent-reuse-count", "1", "--idle-instance-timeout", "30s"],
            cache, mport), port, metrics_port=mport)
        time.sleep(0.5)
        idle_rss, idle_live = s.rss_kib(), s.metric("wasmpool_instances_live")
        threads = [threading.Thread(target=lambda: http_get(s.url + "/sleep/3000", 10)) for _ in range(n)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        busy_rss, busy_live = s.rss_kib(), s.metric("wasmpool_instances_live")
        for t in threads:
            t.join()
        s.stop()
        per = (busy_rss - idle_rss) / max(1.0, busy_live - idle_live)
        out.append({"guest": guest, "live": busy_live, "idle_rss_kib": idle_rss,
                     "busy_rss_kib": busy_rss, "kib_per_instance": per})
        log(f"memory {guest}: {per:.0f} KiB per live instance ({busy_live:.0f} live)")
    return out


def latency(bin_, guests, cache, native_bin, rate, seconds):
    """Constant-rate latency (oha with a rate and latency correction)."""
    out = []
    guest = guests / "p2_hello.wasm"
    flags = ["--max-instance-reuse-count", "128"]
    servers = []
    p = free_port()
    servers.append(("wasmpool", Server("wasmpool", wasmpool_cmd(bin_, guest, p, flags, cache), p)))
    p = free_port()
    servers.append(("wasmtime serve", Server("wasmtime", wasmtime_cmd(guest, p, flags), p)))
    p = free_port()
    servers.append(("native", Server("native", [str(native_bin), f"127.0.0.1:{p}"], p)))
    for name, s in servers:
        wrk(s.url, 1, 16)
        j = json.loads(subprocess.run(
            [str(OHA), "-z", f"{seconds}s", "-q", str(rate), "-c", "16", "--latency-correction",
             "--no-tui", "--output-format", "json", s.url + "/"],
            capture_output=True, text=True, check=True).stdout)
        pct = j["latencyPercentiles"]
        row = {"server": name, "rate": rate, "p50_ms": pct["p50"] * 1000, "p99_ms": pct["p99"] * 1000,
               "success_rate": j["summary"]["successRate"]}
        out.append(row)
        log(f"latency {name} at {rate}/s: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms")
    for _, s in servers:
        s.stop()
    return out


def h2load(url, seconds, conns, h1=False):
    """Closed-loop load with h2load: one stream at a time per connection, so
    HTTP/1.1 and HTTP/2 see the same concurrency."""
    argv = ["h2load", "-t1", f"-c{conns}", "-m1", f"-D{seconds}", url]
    if h1:
        argv.insert(1, "--h1")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    done, ok2xx = int(m.group(2)), int(codes.group(1)) if codes else 0
    # At the end of a -D run h2load may count a 2xx whose stream it did not
    # count as done: never a negative failure count.
    return {"rps": rps, "failed": int(m.group(4)) + int(m.group(5)) + max(0, done - ok2xx)}


# Protocol, URL scheme of the listener, whether h2load speaks HTTP/1.1.
FRONT = [
    ("HTTP/1.1", "http", True),
    ("HTTP/1.1 over TLS", "https", True),
    ("HTTP/2 cleartext (h2c)", "http", False),
    ("HTTP/2 over TLS (ALPN h2)", "https", False),
]


def front(bin_, guests, cache, rounds, seconds):
    """The HTTP front's protocols side by side: one wasmpool process (p2
    hello, reuse 128) with a plain and a TLS listener, each protocol measured
    with h2load at 16 connections in interleaved rounds."""
    tmp = Path(tempfile.mkdtemp(prefix="wasmpool-bench-tls."))
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    plain, tls = free_port(), free_port()
    argv = [str(bin_), "serve", str(guests / "p2_hello.wasm"), "--cache-dir", str(cache),
            "--listen", f"http://127.0.0.1:{plain}", "--listen", f"https://127.0.0.1:{tls}",
            "--tls-cert", str(cert), "--tls-key", str(key), "--max-instance-reuse-count", "128"]
    server = Server("wasmpool (front)", argv, plain)
    urls = {"http": f"http://127.0.0.1:{plain}/", "https": f"https://127.0.0.1:{tls}/"}
    rows = {name: [] for name, _, _ in FRONT}
    failed = {name: 0 for name, _, _ in FRONT}
    try:
        for name, scheme, h1 in FRONT:  # warm-up
            h2load(urls[scheme], 1, 16, h1)
        for r in range(rounds):
            for name, scheme, h1 in FRONT:
                m = h2load(urls[scheme], seconds, 16, h1)
                rows[name].append(m["rps"])
                failed[name] += m["failed"]
            log(f"front round {r + 1}: " + ", ".join(f"{n} {rows[n][-1]:.0f}" for n in rows))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    base = "HTTP/1.1"
    return [{"protocol": n, "rps": statistics.median(rows[n]), "rounds": rows[n], "failed": failed[n],
             "vs_h1": statistics.median(a / b for a, b in zip(rows[n], rows[base]))} for n in rows]


class OtlpSink:
    """A local OTLP/HTTP receiver that takes every export: nginx, one
    worker, reading each body and answering 200 at once (an empty
    ExportTraceServiceResponse). What a collector on the same host costs
    the sender, without the collector's own work: on two cores the
    receiver competes with the server, and a Python receiver spent more
    CPU reading the exports (5-8% of a core at 60,000 spans/s) than
    wasmpool spent sending them."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="wasmpool-bench-otlp."))
        port = free_port()
        (self.dir / "nginx.conf").write_text(f"""
user root root;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format sink '$content_length';
    access_log {self.dir}/exports.log sink buffer=64k flush=1s;
    client_body_temp_path {self.dir};
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location = /v1/traces {{ return 200; }}
    }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            if listening(port):
                break
            time.sleep(0.05)
        self.exports = 0
        self.bytes = 0

    def stop(self):
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        lines = (self.dir / "exports.log").read_text().split()
        self.exports = len(lines)
        self.bytes = sum(int(n) for n in lines)
        shutil.rmtree(self.dir, ignore_errors=True)


TRACEPARENT = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

TELEMETRY_GUESTS = [
    ("p3 hello, defaults", "p3_suite.wasm", []),
    ("Python p2, reuse 128", "py_p2.wasm", ["--max-instance-reuse-count", "128"]),
]


def telemetry(bin_, guests, cache, rounds, seconds, conns=16):
    """What the access log and tracing cost, side by side: wasmpool at its
    defaults (access log on, tracing off), with both off, with requests
    carrying a traceparent (propagation only), and exporting every request
    (ratio 1.0) to a local OTLP receiver; interleaved rounds."""
    out = []
    for name, guest, flags in TELEMETRY_GUESTS:
        sink = OtlpSink()
        export_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_TRACES_SAMPLER": "traceidratio",
                      "OTEL_TRACES_SAMPLER_ARG": "1.0"}
        variants = [
            ("defaults", "defaults: access log on, tracing off", [], {}, ()),
            ("off", "access log off, tracing off", ["--access-log", "off"], {}, ()),
            ("propagate", "defaults, requests carry a traceparent (propagation only)", [], {}, (TRACEPARENT,)),
            ("export", "defaults + export, ratio 1.0, local receiver", [], export_env, ()),
        ]
        servers, mports = {}, {}
        for key, _, extra, env, _ in variants:
            p, mports[key] = free_port(), free_port()
            servers[key] = Server(f"wasmpool ({key})",
                                  wasmpool_cmd(bin_, guests / guest, p, flags + extra, cache, mports[key]),
                                  p, env=env, metrics_port=mports[key])
        log(f"== telemetry: {name}")
        for key, _, _, _, headers in variants:  # warm-up
            wrk(servers[key].url, 1, conns, "/", headers)
        rows = {key: [] for key, *_ in variants}
        errors = {key: 0 for key, *_ in variants}
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for key, _, _, _, headers in order:
                m = wrk(servers[key].url, seconds, conns, "/", headers)
                rows[key].append(m["rps"])
                errors[key] += m["non2xx"] + m["socket_errors"]
            log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rows.items()))
        dropped = servers["export"].metric("wasmpool_trace_spans_dropped_total")
        exported = servers["export"].metric("wasmpool_trace_spans_exported_total")
        for s_ in servers.values():
            s_.stop()
        sink.stop()
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(rows[a], rows[b]))
        out.append({
            "scenario": name, "guest": guest, "flags": flags, "connections": conns,
            "variants": [{"key": k, "label": label, "rps": statistics.median(rows[k]), "rounds": rows[k],
                          "errors": errors[k]} for k, label, *_ in variants],
            "defaults_vs_off": ratio("defaults", "off"),
            "propagate_vs_defaults": ratio("propagate", "defaults"),
            "export_vs_defaults": ratio("export", "defaults"),
            "export_vs_off": ratio("export", "off"),
            "spans_exported": exported, "spans_dropped": dropped,
            "otlp_exports": sink.exports, "otlp_bytes": sink.bytes,
        })
        t = out[-1]
        log(f"  -> defaults/off {t['defaults_vs_off']:.3f}, propagation/defaults {t['propagate_vs_defaults']:.3f}, "
            f"export/defaults {t['export_vs_defaults']:.3f}; spans exported {exported:.0f}, dropped {dropped:.0f}")
    return out


NGINX_SCENARIOS = [
    ("p2 hello, reuse 128", "p2_hello.wasm", "/", ["--max-instance-reuse-count", "128"],
     ["wasmpool_max_instance_reuse_count 128;"]),
    ("p3 hello, defaults", "p3_suite.wasm", "/", [], []),
    ("Python p2, reuse 128", "py_p2.wasm", "/", ["--max-instance-reuse-count", "128"],
     ["wasmpool_max_instance_reuse_count 128;"]),
]


def nginx_server(name, module, body, tmp):
    """nginx in the foreground (its master is the process), as a distribution
    runs it: worker_processes auto, the access log on, to a file."""
    d = Path(tempfile.mkdtemp(prefix="wasmpool-bench-nginx.", dir=tmp))
    (d / "logs").mkdir()
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(f"""
{f"load_module {module};" if module else ""}
user root root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d};
    server {{
        listen 127.0.0.1:{port};
{body}
    }}
}}
""")
    return Server(name, ["nginx", "-p", str(d), "-c", str(conf), "-g", "daemon off;"], port)


def nginx(bin_, guests, cache, rounds, seconds, module, conns=16):
    """nginx with the module, nginx proxy_pass to wasmpool serve over a unix
    socket with upstream keepalive (the way to put nginx in front today),
    and wasmpool serve alone; interleaved rounds, same guests."""
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="wasmpool-bench-nginx."))
    os.chmod(tmp, 0o755)
    for name, guest, path, flags, directives in NGINX_SCENARIOS:
        log(f"== nginx: {name}")
        servers = {}
        p, mport = free_port(), free_port()
        servers["serve"] = Server("wasmpool serve", wasmpool_cmd(bin_, guests / guest, p, flags, cache, mport), p,
                                  metrics_port=mport)
        sock = tmp / f"wasmpool-{guest}.sock"
        behind = [str(bin_), "serve", str(guests / guest), "--listen", f"unix:{sock}", "--cache-dir", str(cache),
                  *flags]
        servers["behind"] = subprocess.Popen(behind, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(3000):
            if sock.exists():
                break
            time.sleep(0.05)
        servers["proxy"] = nginx_server("nginx proxy_pass", None, f"""
        location / {{
            proxy_pass http://wasmpool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    upstream wasmpool {{
        server unix:{sock};
        keepalive 64;""", tmp)
        for key, extra in (("module", ""), ("noinline", "wasmpool_inline off;")):
            servers[key] = nginx_server(f"nginx + module {extra}", module, f"""
        location / {{
            wasmpool_component {guests / guest};
            wasmpool_cache_dir {cache};
            {" ".join(directives)}
            {extra}
        }}""", tmp)
        measured = ["module", "noinline", "proxy", "serve"]
        for k in measured:  # warm-up
            wrk(servers[k].url, 1, conns, path)
        rows = {k: [] for k in measured}
        errors = {k: 0 for k in measured}
        for r in range(rounds):
            for k in (measured if r % 2 == 0 else measured[::-1]):
                m = wrk(servers[k].url, seconds, conns, path)
                rows[k].append(m["rps"])
                errors[k] += m["non2xx"] + m["socket_errors"]
            log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rows.items()))
        for k, s in servers.items():
            if k == "behind":
                s.terminate()
                s.wait(10)
            else:
                s.stop()
        res = {
            "scenario": name, "guest": guest, "flags": flags, "connections": conns,
            "rps": {k: statistics.median(v) for k, v in rows.items()},
            "rounds": rows, "errors": errors,
            "module_vs_proxy": statistics.median(a / b for a, b in zip(rows["module"], rows["proxy"])),
            "module_vs_serve": statistics.median(a / b for a, b in zip(rows["module"], rows["serve"])),
            "module_vs_noinline": statistics.median(a / b for a, b in zip(rows["module"], rows["noinline"])),
        }
        out.append(res)
        log(f"  -> module {res['module_vs_proxy']:.2f}x proxy_pass, {res['module_vs_serve']:.2f}x wasmpool serve, "
            f"{res['module_vs_noinline']:.2f}x inline off")
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def api_push(bin_dir, guests, cache, rounds):
    """The C API (push + completion callbacks) against the Rust API. The C
    harness runs twice: woken for every completion (as the Rust loop takes
    one permit at a time), and refilling in batches of 16 (as an event loop
    takes completions)."""
    c_bin = bin_dir / "push_bench"
    rust_bin = bin_dir / "api_push"
    runs = [("c", [str(c_bin)], ["1"]), ("c_batch16", [str(c_bin)], ["16"]), ("rust", [str(rust_bin)], [])]
    rows = {k: [] for k, _, _ in runs}
    for r in range(rounds):
        for k, argv, extra in (runs if r % 2 == 0 else runs[::-1]):
            out = subprocess.run(argv + [str(guests / "p3_suite.wasm"), str(cache), "100000", "64"] + extra,
                                 capture_output=True, text=True, check=True).stdout
            rows[k].append(float(re.search(r"([\d.]+) req/s", out).group(1)))
        log(f"api push: c {rows['c'][-1]:.0f}, c batch 16 {rows['c_batch16'][-1]:.0f}, rust {rows['rust'][-1]:.0f}")
    return {"rounds": rows, "c_rps": statistics.median(rows["c"]),
            "c_batch16_rps": statistics.median(rows["c_batch16"]),
            "rust_rps": statistics.median(rows["rust"]),
            "ratio": statistics.median(a / b for a, b in zip(rows["c"], rows["rust"])),
            "ratio_batch16": statistics.median(a / b for a, b in zip(rows["c_batch16"], rows["rust"]))}


def main():
    # Both servers run as a service would: with RUST_BACKTRACE=1 every store
    # wasmtime drops captures a backtrace (wasmpool turns library backtraces
    # off itself unless RUST_LIB_BACKTRACE is set; `wasmtime serve` does not).
    for v in ("RUST_BACKTRACE", "RUST_LIB_BACKTRACE"):
        os.environ.pop(v, None)
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--native", required=True)
    ap.add_argument("--guests", required=True)
    ap.add_argument("--api-bins", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--only", help="regex: only these throughput scenarios")
    ap.add_argument("--telemetry", action="store_true",
                    help="with --only: run the telemetry scenarios too")
    ap.add_argument("--nginx-module", help="ngx_http_wasmpool_module.so: run the nginx rows")
    ap.add_argument("--nginx", action="store_true", help="with --only: run the nginx rows too")
    a = ap.parse_args()
    bin_, guests = Path(a.bin), Path(a.guests)
    cache = Path(tempfile.mkdtemp(prefix="wasmpool-bench-cache."))
    started = time.time()
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                         if l.startswith("model name")), platform.processor()),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "kernel": platform.release(),
        },
        "versions": {
            "wasmpool": subprocess.run([str(bin_), "--version"], capture_output=True, text=True).stdout.strip(),
            "wasmtime": subprocess.run([str(WASMTIME), "--version"], capture_output=True, text=True).stdout.strip(),
            "wrk": "wrk 4.1.0 (Debian)",
            "h2load": subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip(),
            "oha": subprocess.run([str(OHA), "--version"], capture_output=True, text=True).stdout.strip(),
        },
        "rounds": a.rounds, "seconds": a.seconds,
    }
    res["throughput"] = throughput(bin_, guests, cache, a.rounds, a.seconds, Path(a.native), a.only)
    if not a.only:
        hello = next(r for r in res["throughput"] if r["scenario"] == "p2 hello, reuse 128")
        rate = int(min(hello["rps"]["wasmpool"], hello["rps"]["wasmtime"]) * 0.5 // 100 * 100)
        res["latency"] = latency(bin_, guests, cache, Path(a.native), rate, 10)
        res["io_peaks"] = io_peaks(bin_, guests, cache)
        res["cold_start"] = cold_start(bin_, guests, 5, 21)
        res["memory"] = memory(bin_, guests, cache)
        res["api_push"] = api_push(Path(a.api_bins), guests, cache, a.rounds)
        res["front"] = front(bin_, guests, cache, a.rounds, a.seconds)
    if not a.only or a.telemetry:
        # A 3% effect on this noisy host needs more rounds than the rest.
        res["telemetry"] = telemetry(bin_, guests, cache, max(a.rounds, 9), a.seconds)
    if a.nginx_module and (not a.only or a.nginx):
        res["nginx"] = nginx(bin_, guests, cache, a.rounds, a.seconds, a.nginx_module)
    res["duration_s"] = round(time.time() - started)
    Path(a.out).write_text(json.dumps(res, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    log(f"wrote {a.out} in {res['duration_s']} s")


if __name__ == "__main__":
    main()
