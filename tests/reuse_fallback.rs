//! `reuse = auto | always | never`. Under auto, a request that fails on a
//! reused instance is retried once on a fresh instance, and if that one
//! answers, the component's instances are no longer reused. The p2 test
//! guest's `/once` route answers only on a fresh instance, as
//! componentize-js guests do (tests/js_guests.rs runs a real one).
mod common;
use bytes::Bytes;
use common::*;
use wasmpool::KnobArgs;
use wasmpool::config::ReuseMode;

fn reuse_128(mode: Option<ReuseMode>) -> KnobArgs {
    KnobArgs {
        max_instance_reuse_count: Some(128),
        reuse: mode,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_passes_the_failures_on() {
    let s = TestServer::start(p2_suite(), reuse_128(Some(ReuseMode::Always))).await;
    assert_eq!(s.get("/once").await.status, 200);
    settle().await;
    assert_eq!(s.get("/once").await.status, 500);
    assert_eq!(s.stats().retries, 0);
    assert!(!s.front.pool().reuse_disabled());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_retries_on_a_fresh_instance_then_stops_reusing() {
    // auto is the default.
    let s = TestServer::start(p2_suite(), reuse_128(None)).await;
    for i in 0..8 {
        let r = s.get("/once").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert!(r.text().starts_with("GET /once"), "{}", r.text());
        settle().await;
    }
    let st = s.stats();
    assert_eq!((st.retries, st.reuse_fallbacks), (1, 1), "{st:?}");
    // Only the failed attempt ran on a reused instance.
    assert_eq!(st.instances_reused, 1, "{st:?}");
    assert_eq!(st.failed, 0, "{st:?}");
    assert!(s.front.pool().reuse_disabled());
    // Now every instance serves one request.
    assert_eq!(s.get("/counter").await.text(), "1");
    settle().await;
    assert_eq!(s.get("/counter").await.text(), "1");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_replays_a_body_the_guest_did_not_read() {
    let s = TestServer::start(p2_suite(), reuse_128(None)).await;
    assert_eq!(s.get("/once").await.status, 200);
    settle().await;
    let r = send(
        s.addr,
        "POST",
        "/once",
        &[],
        Bytes::from_static(b"the payload"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("the payload"), "{}", r.text());
    assert_eq!(s.stats().retries, 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_reusing_when_a_fresh_instance_fails_too() {
    let s = TestServer::start(p2_suite(), reuse_128(None)).await;
    assert_eq!(s.get("/counter").await.text(), "1");
    settle().await;
    // Traps on the reused instance, and again on a fresh one: the guest
    // fails either way, so reuse is not to blame.
    assert_eq!(s.get("/trap").await.status, 500);
    settle().await;
    let st = s.stats();
    assert_eq!((st.retries, st.reuse_fallbacks), (1, 0), "{st:?}");
    assert!(!s.front.pool().reuse_disabled());
    assert_eq!(s.get("/counter").await.text(), "1");
    settle().await;
    assert_eq!(s.get("/counter").await.text(), "2");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_uses_each_instance_once() {
    let s = TestServer::start(p2_suite(), reuse_128(Some(ReuseMode::Never))).await;
    for _ in 0..3 {
        assert_eq!(s.get("/counter").await.text(), "1");
        settle().await;
    }
    assert_eq!(s.stats().instances_reused, 0);
    assert_eq!(s.front.pool().reuse_limits(), (1, 1));
    s.stop().await;
    // Also for WASIp3, whose default is 128 requests, 16 at a time.
    let s = TestServer::start(p3_suite(), reuse_128(Some(ReuseMode::Never))).await;
    assert_eq!(s.front.pool().reuse_limits(), (1, 1));
    for _ in 0..3 {
        assert_eq!(s.get("/counter").await.text(), "1");
        settle().await;
    }
    s.stop().await;
}

#[test]
fn reuse_mode_is_checked() {
    let ok: KnobArgs = toml::from_str("reuse = \"never\"").unwrap();
    assert_eq!(ok.reuse, Some(ReuseMode::Never));
    let err = toml::from_str::<KnobArgs>("reuse = \"sometimes\"").unwrap_err();
    assert!(err.to_string().contains("auto"), "{err}");
}
