//! Traces: W3C trace context into and out of the guest, and the spans
//! exported over OTLP/HTTP, checked by a receiver that decodes the
//! protobuf the way a collector does.
mod common;
use bytes::Bytes;
use common::otlp::Receiver;
use common::*;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A loopback upstream that answers 204 and keeps the `traceparent` and
/// `tracestate` each request came with.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<(String, String)>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { break };
            let seen = s2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default()
                    };
                    seen.lock()
                        .unwrap()
                        .push((h("traceparent"), h("tracestate")));
                    async {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(204)
                                .body(http_body_util::Empty::<Bytes>::new())
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn write_guest(dir: &std::path::Path, bytes: Vec<u8>) -> String {
    let p = dir.join("app.wasm");
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

fn python_p2() -> Vec<u8> {
    static G: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    G.get_or_init(|| python_guest("p2")).clone()
}

const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(flags: &str) -> String {
    format!("00-{PARENT_TRACE}-{PARENT_SPAN}-{flags}")
}

/// The `traceparent` the /echo guest saw (it echoes the headers).
fn seen_traceparent(echo: &str) -> Option<String> {
    echo.lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .map(str::to_string)
}

fn export_env(r: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
        ("OTEL_SERVICE_NAME", "edge-api".into()),
    ]
}

fn serve(args: &[&str], env: &[(&'static str, String)]) -> (Proc, SocketAddr) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (proc, addrs) = Proc::serve(args, &env);
    (proc, sockaddr(&addrs[0]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_plain_a_queued_a_timed_out_and_a_trapping_request() {
    let r = Receiver::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let app = write_guest(dir.path(), p2_suite());
    let mut env = export_env(&r);
    env.push(("OTEL_EXPORTER_OTLP_HEADERS", "x-team=edge".into()));
    let (proc, addr) = serve(
        &[
            "serve",
            &app,
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
            "--max-concurrent-requests",
            "1",
            "--max-queue-wait",
            "5s",
            "--request-timeout",
            "1s",
        ],
        &env,
    );
    assert!(
        proc.log().contains("exporting traces to http://"),
        "{}",
        proc.log()
    );

    // A plain request continuing an incoming trace: the guest sees the
    // server span's context, the server span's parent is the caller's.
    let tp = traceparent("01");
    let reply = send(
        addr,
        "POST",
        "/echo?x=1",
        &[
            ("traceparent", &tp),
            ("tracestate", "vendor=opaque"),
            ("user-agent", "trace-test"),
        ],
        Bytes::from_static(b"hello"),
    )
    .await;
    assert_eq!(reply.status, 200);
    let echo = reply.text();
    let seen = seen_traceparent(&echo).expect("the guest sees a traceparent");
    assert!(echo.contains("tracestate: vendor=opaque"), "{echo}");
    assert!(seen.starts_with(&format!("00-{PARENT_TRACE}-")), "{seen}");
    assert!(seen.ends_with("-01"), "{seen}");
    let server_span_id = seen[36..52].to_string();
    assert_ne!(server_span_id, PARENT_SPAN);
    let spans = r.trace(PARENT_TRACE).await;
    let server = spans.iter().find(|g| g.kind() == SpanKind::Server).unwrap();
    assert_eq!(server.id(), server_span_id);
    assert_eq!(server.parent(), PARENT_SPAN);
    assert_eq!(server.service, "edge-api team=edge");
    assert_eq!(server.span.name, "POST");
    assert_eq!(server.str("http.request.method").as_deref(), Some("POST"));
    assert_eq!(server.str("url.path").as_deref(), Some("/echo"));
    assert_eq!(server.str("url.query").as_deref(), Some("x=1"));
    assert_eq!(
        server.str("network.protocol.version").as_deref(),
        Some("1.1")
    );
    assert_eq!(server.str("client.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        server.str("user_agent.original").as_deref(),
        Some("trace-test")
    );
    assert_eq!(server.int("http.response.status_code"), Some(200));
    assert_eq!(server.int("http.request.body.size"), Some(5));
    assert_eq!(
        server.int("http.response.body.size"),
        Some(reply.body.len() as i64)
    );
    assert!(server.int("wasmpool.instance.id").unwrap() > 0);
    assert!(server.attr("wasmpool.instance.reused").is_some());
    assert!(server.attr("wasmpool.guest.duration_ms").is_some());
    assert_eq!(server.error(), None);
    // The access line carries the ids.
    proc.wait_log(
        &format!("trace_id={PARENT_TRACE} span_id={server_span_id}"),
        Duration::from_secs(5),
    );

    // A queued request: one slot, held by a sleeper.
    let sleeper =
        tokio::spawn(async move { send(addr, "GET", "/sleep/600", &[], Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued = send(addr, "GET", "/echo", &[], Bytes::new()).await;
    assert_eq!(queued.status, 200);
    assert_eq!(sleeper.await.unwrap().status, 200);
    let tp = seen_traceparent(&queued.text()).expect("a new trace reaches the guest");
    let spans = r.trace(&tp[3..35]).await;
    let server = spans.iter().find(|g| g.kind() == SpanKind::Server).unwrap();
    assert_eq!(server.parent(), "", "a new trace has no parent");
    let wait = spans
        .iter()
        .find(|g| g.span.name == "wasmpool.queue")
        .expect("a queue span");
    assert_eq!(wait.parent(), server.id());
    assert!(server.attr("wasmpool.queue.wait_ms").is_some());
    let waited = wait.span.end_time_unix_nano - wait.span.start_time_unix_nano;
    assert!(waited >= 200_000_000, "waited {waited} ns");
    // WASIp2 by default: one request per instance; the one start-up made
    // went to the first request, this one's was made for it.
    let inst = spans
        .iter()
        .find(|g| g.span.name == "wasmpool.instantiate")
        .expect("an instantiation span");
    assert_eq!(inst.parent(), server.id());
    assert!(server.attr("wasmpool.instantiation.duration_ms").is_some());
    assert!(inst.span.start_time_unix_nano >= wait.span.end_time_unix_nano);
    assert!(inst.span.end_time_unix_nano <= server.span.end_time_unix_nano);

    // A request over the timeout: 504, the span's status says why.
    let tp = traceparent("01").replace(PARENT_TRACE, "11111111111111111111111111111111");
    let late = send(
        addr,
        "GET",
        "/sleep/3000",
        &[("traceparent", &tp)],
        Bytes::new(),
    )
    .await;
    assert_eq!(late.status, 504);
    let spans = r.trace("11111111111111111111111111111111").await;
    let server = spans.iter().find(|g| g.kind() == SpanKind::Server).unwrap();
    assert_eq!(server.int("http.response.status_code"), Some(504));
    assert!(
        server.error().unwrap().contains("request timeout"),
        "{:?}",
        server.error()
    );

    // A trap: 500 with the trap as the reason.
    let tp = traceparent("01").replace(PARENT_TRACE, "22222222222222222222222222222222");
    let trap = send(addr, "GET", "/trap", &[("traceparent", &tp)], Bytes::new()).await;
    assert_eq!(trap.status, 500);
    let spans = r.trace("22222222222222222222222222222222").await;
    let server = spans.iter().find(|g| g.kind() == SpanKind::Server).unwrap();
    assert!(
        server.error().unwrap().contains("trapped"),
        "{:?}",
        server.error()
    );

    // A malformed traceparent is ignored: a new trace starts.
    let bad = send(
        addr,
        "GET",
        "/echo",
        &[
            ("traceparent", "00-XYZ-00f067aa0ba902b7-01"),
            ("tracestate", "a=b"),
        ],
        Bytes::new(),
    )
    .await;
    let tp = seen_traceparent(&bad.text()).unwrap();
    assert_ne!(&tp[3..35], PARENT_TRACE);
    assert!(!bad.text().contains("tracestate"), "{}", bad.text());
    let spans = r.trace(&tp[3..35]).await;
    assert_eq!(
        spans
            .iter()
            .find(|g| g.kind() == SpanKind::Server)
            .unwrap()
            .parent(),
        ""
    );
    // Drain flushes what is queued: the exporter is not waited on later.
    let status = proc.stop(libc::SIGTERM);
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_reaches_the_guests_upstream_with_and_without_export() {
    let dir = tempfile::tempdir().unwrap();
    let app = write_guest(dir.path(), python_p2());
    let (up, seen) = upstream().await;
    let allow = format!("127.0.0.1:{}", up.port());
    let fetch = format!("/fetch/{}", up.port());
    let tp = traceparent("01");

    // Propagation only (no endpoint): the upstream gets the caller's
    // context unchanged; nothing is exported.
    let (proc, addr) = serve(
        &[
            "serve",
            &app,
            "--listen",
            "127.0.0.1:0",
            "--allow-outbound",
            &allow,
        ],
        &[],
    );
    let r = send(
        addr,
        "GET",
        &fetch,
        &[("traceparent", &tp), ("tracestate", "v=1")],
        Bytes::new(),
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "upstream 204"));
    assert_eq!(
        seen.lock().unwrap().pop(),
        Some((tp.clone(), "v=1".to_string()))
    );
    // No incoming context: none is made up.
    let r = send(addr, "GET", &fetch, &[], Bytes::new()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        seen.lock().unwrap().pop(),
        Some((String::new(), String::new()))
    );
    proc.stop(libc::SIGTERM);

    // trace-context off: the context is not carried.
    let cfg = dir.path().join("off.toml");
    std::fs::write(&cfg, "trace-context = false\n").unwrap();
    let (proc, addr) = serve(
        &[
            "serve",
            &app,
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--allow-outbound",
            &allow,
        ],
        &[],
    );
    let r = send(addr, "GET", &fetch, &[("traceparent", &tp)], Bytes::new()).await;
    assert_eq!(r.status, 200);
    assert_eq!(seen.lock().unwrap().pop().unwrap().0, "");
    proc.stop(libc::SIGTERM);

    // Export: the upstream's parent is the client span, whose parent is
    // the server span, whose parent is the caller.
    let rec = Receiver::start(Duration::ZERO).await;
    let (proc, addr) = serve(
        &[
            "serve",
            &app,
            "--listen",
            "127.0.0.1:0",
            "--allow-outbound",
            &allow,
        ],
        &export_env(&rec),
    );
    let r = send(addr, "GET", &fetch, &[("traceparent", &tp)], Bytes::new()).await;
    assert_eq!(r.status, 200);
    let (got, _) = seen.lock().unwrap().pop().unwrap();
    assert_eq!(&got[3..35], PARENT_TRACE);
    let end = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = rec.trace(PARENT_TRACE).await;
        if spans.iter().any(|g| g.kind() == SpanKind::Client) || Instant::now() > end {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let server = spans.iter().find(|g| g.kind() == SpanKind::Server).unwrap();
    let client = spans
        .iter()
        .find(|g| g.kind() == SpanKind::Client)
        .expect("a client span");
    assert_eq!(server.parent(), PARENT_SPAN);
    assert_eq!(client.parent(), server.id());
    assert_eq!(&got[36..52], client.id());
    assert_eq!(client.int("http.response.status_code"), Some(204));
    assert_eq!(client.str("server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(client.int("server.port"), Some(i64::from(up.port())));
    assert_eq!(client.str("http.request.method").as_deref(), Some("GET"));
    proc.stop(libc::SIGTERM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_or_slow_changes_nothing_for_clients() {
    let dir = tempfile::tempdir().unwrap();
    let app = write_guest(dir.path(), p2_suite());
    // Down: nothing listens on the port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let slow = Receiver::start(Duration::from_secs(3)).await;
    for (endpoint, queue) in [(down, "4096"), (slow.endpoint(), "8")] {
        let env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY", "10".into()),
            ("OTEL_BSP_MAX_QUEUE_SIZE", queue.into()),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8".into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10000".into()),
        ];
        let (proc, addr) = serve(
            &[
                "serve",
                &app,
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--max-instance-reuse-count",
                "1000",
            ],
            &env,
        );
        let metrics = proc.metrics_addr();
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        for _ in 0..200 {
            let t = Instant::now();
            let r = send(addr, "GET", "/", &[], Bytes::new()).await;
            assert_eq!(r.status, 200);
            slowest = slowest.max(t.elapsed());
        }
        // 200 requests on loopback: well under a second each even on a
        // loaded machine; the export (3 s per batch when slow) is not
        // waited on.
        assert!(
            slowest < Duration::from_secs(1),
            "{endpoint}: slowest {slowest:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let m = send(metrics, "GET", "/metrics", &[], Bytes::new())
                .await
                .text();
            let dropped: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("wasmpool_trace_spans_dropped_total "))
                .expect("the dropped-span counter")
                .parse()
                .unwrap();
            if dropped > 0 {
                break;
            }
            assert!(
                Instant::now() < end,
                "{endpoint}: no span counted as dropped: {m}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The drain's flush is bounded too.
        let t = Instant::now();
        let mut proc = proc;
        proc.signal(libc::SIGTERM);
        proc.wait_exit(Duration::from_secs(20)).expect("exits");
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_at_0_and_1() {
    let dir = tempfile::tempdir().unwrap();
    let app = write_guest(dir.path(), p2_suite());
    for ratio in ["0", "1"] {
        let r = Receiver::start(Duration::ZERO).await;
        let mut env = export_env(&r);
        env.push(("OTEL_TRACES_SAMPLER", "traceidratio".into()));
        env.push(("OTEL_TRACES_SAMPLER_ARG", ratio.into()));
        let (proc, addr) = serve(
            &["serve", &app, "--listen", "127.0.0.1:0", "--no-cache"],
            &env,
        );
        let mut traces = Vec::new();
        for _ in 0..20 {
            let reply = send(addr, "GET", "/echo", &[], Bytes::new()).await;
            let tp = seen_traceparent(&reply.text()).unwrap();
            // Sampled or not, the guest gets a context to pass on, its
            // flag saying which.
            assert!(
                tp.ends_with(if ratio == "1" { "-01" } else { "-00" }),
                "{tp}"
            );
            traces.push(tp[3..35].to_string());
        }
        let mut proc = proc;
        proc.signal(libc::SIGTERM);
        proc.wait_exit(Duration::from_secs(20)).unwrap();
        let servers: HashMap<String, usize> = r
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.kind() == SpanKind::Server)
            .fold(HashMap::new(), |mut m, g| {
                *m.entry(g.trace_id()).or_default() += 1;
                m
            });
        if ratio == "1" {
            for t in &traces {
                assert_eq!(servers.get(t), Some(&1), "trace {t}");
            }
        } else {
            assert_eq!(r.count(), 0);
            assert_eq!(*r.exports.lock().unwrap(), 0);
        }
    }
}

#[test]
fn bad_settings_are_one_line_errors_naming_the_variable_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let app = write_guest(dir.path(), p2_suite());
    let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    for (env, file, name) in [
        (
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "nope")],
            "",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            vec![ep, ("OTEL_EXPORTER_OTLP_HEADERS", "x")],
            "",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        (
            vec![ep, ("OTEL_TRACES_SAMPLER", "maybe")],
            "",
            "OTEL_TRACES_SAMPLER",
        ),
        (
            vec![
                ep,
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ],
            "",
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            vec![],
            "[otel]\nendpoint = \"http://c:4318\"\ntraces-sampler = \"x\"\n",
            "otel.traces-sampler",
        ),
        (
            vec![],
            "[otel]\nendpoint = \"localhost\"\n",
            "otel.endpoint",
        ),
        (vec![], "[otel]\nendpont = \"http://c\"\n", "endpont"),
    ] {
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, file).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmpool"))
            .args([
                "serve",
                &app,
                "--config",
                cfg.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(name), "{name}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.contains("error")).count(),
            1,
            "{name}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_bad_trace_settings_keeps_the_old_ones() {
    let r = Receiver::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let app = write_guest(dir.path(), p2_suite());
    let cfg = dir.path().join("c.toml");
    let good = format!(
        "component = \"{app}\"\nlisten = [\"127.0.0.1:0\"]\n[otel]\nendpoint = \"{}\"\n",
        r.endpoint()
    );
    std::fs::write(&cfg, &good).unwrap();
    let (proc, addr) = serve(
        &["serve", "--config", cfg.to_str().unwrap()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "50".into())],
    );
    std::fs::write(&cfg, format!("{good}traces-sampler = \"sometimes\"\n")).unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_log("reload failed", Duration::from_secs(30));
    assert!(proc.log().contains("otel.traces-sampler"), "{}", proc.log());
    let reply = send(addr, "GET", "/echo", &[], Bytes::new()).await;
    let tp = seen_traceparent(&reply.text()).unwrap();
    r.trace(&tp[3..35]).await;
    proc.stop(libc::SIGTERM);
}
