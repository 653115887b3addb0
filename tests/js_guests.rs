//! A real componentize-js guest (StarlingMonkey), whose instances answer
//! only their first request: with `reuse = always` clients see 500s; with
//! the default `auto`, none.
mod common;
use bytes::Bytes;
use common::*;
use wasmpool::KnobArgs;
use wasmpool::config::ReuseMode;

fn knobs(mode: Option<ReuseMode>) -> KnobArgs {
    KnobArgs {
        max_instance_reuse_count: Some(128),
        reuse: mode,
        cache_dir: Some(shared_cache()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_reuse_shows_the_failures() {
    let s = TestServer::start(js_guest(), knobs(Some(ReuseMode::Always))).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(s.get("/").await.status);
        settle().await;
    }
    assert_eq!(codes[0], 200, "{codes:?}");
    assert!(codes.contains(&500), "{codes:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_reuse_fails_no_request() {
    let s = TestServer::start(js_guest(), knobs(None)).await;
    // One after another, with time for instances to become reusable ...
    for i in 0..6 {
        let r = s.get(&format!("/seq/{i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("hello from js: GET /seq/{i} \n"));
        settle().await;
    }
    // ... and in concurrent bursts, bodies included.
    for round in 0..4 {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let addr = s.addr;
            tasks.push(tokio::spawn(async move {
                let body = format!("r{round}-{i}");
                let r = send(addr, "POST", "/burst", &[], Bytes::from(body.clone())).await;
                (r.status, r.text(), body)
            }));
        }
        for t in tasks {
            let (status, text, body) = t.await.unwrap();
            assert_eq!(status, 200, "{text}");
            assert_eq!(text, format!("hello from js: POST /burst {body}\n"));
        }
        settle().await;
    }
    let st = s.stats();
    assert_eq!(st.failed, 0, "{st:?}");
    assert_eq!(st.reuse_fallbacks, 1, "{st:?}");
    assert!(s.front.pool().reuse_disabled());
    s.stop().await;
}

#[test]
fn check_reports_the_guest_cannot_be_reused() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("app.wasm");
    std::fs::write(&wasm, js_guest()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmpool"))
        .arg("check")
        .arg(&wasm)
        .arg("--cache-dir")
        .arg(shared_cache())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("FAILS on a reused instance"), "{stdout}");
    assert!(stdout.contains("reuse = auto"), "{stdout}");
    // StarlingMonkey starts with a heap of several MiB: slots copy it back.
    assert!(stdout.contains("reset by copying"), "{stdout}");
    // The bundled hello component survives reuse.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmpool"))
        .args(["check", "--no-cache"])
        .arg(root().join("examples/hello.wasm"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reuse probe (GET / twice on one instance): ok"),
        "{stdout}"
    );
    assert!(
        stdout.contains("the pages its instances wrote") && stdout.contains("initial memory 64KiB"),
        "{stdout}"
    );
}
