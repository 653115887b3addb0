//! Fault injection with purpose-built guests: what the client sees, and
//! that everything else keeps working. Traps before the response head,
//! busy loops, sleeps past the timeout and memory bombs are in
//! tests/knobs.rs (`trap_*`, `request_timeout_*`, `max_memory_size`);
//! a host panic is in src/http/front.rs's unit tests.
mod common;
use bytes::Bytes;
use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmpool::http::{Front, ListenAddr, Listener};
use wasmpool::{KnobArgs, Pool, Source};

fn start_trap() -> Vec<u8> {
    build_component(
        &root().join("tests/guests/start_trap.wat"),
        &root().join("tests/guests/wit/p2"),
        "p2",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_after_the_response_head() {
    let s = TestServer::start(p2_suite(), KnobArgs::default()).await;
    // The head and body went out before the trap: the client has its
    // answer; the instance is gone and the next request is served.
    let r = try_send(s.addr, "GET", "/trap-after", &[], Bytes::new()).await;
    if let Ok(r) = &r {
        assert_eq!(r.status, 200);
    }
    assert_eq!(s.get("/").await.status, 200);
    assert!(eventually(Duration::from_secs(5), || s.stats().traps >= 1).await);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_answers() {
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            request_timeout: Some(Duration::from_millis(500)),
            ..Default::default()
        },
    )
    .await;
    // Returns without a response (p2 /silent): 500 at once, not a hang.
    let p2 = TestServer::start(p2_suite(), KnobArgs::default()).await;
    let t = Instant::now();
    assert_eq!(p2.get("/silent").await.status, 500);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    p2.stop().await;
    // Keeps running without answering: 504 within request-timeout plus a
    // second, while other requests are served meanwhile.
    let addr = s.addr;
    let stuck = tokio::spawn(async move {
        let t = Instant::now();
        let r = send(addr, "GET", "/sleep/60000", &[], Bytes::new()).await;
        (r.status, t.elapsed())
    });
    for _ in 0..5 {
        assert_eq!(s.get("/").await.status, 200);
    }
    let (status, took) = stuck.await.unwrap();
    assert_eq!(status, 504);
    assert!(took < Duration::from_millis(1500), "{took:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instantiation_failure_is_503_and_the_server_recovers() {
    let knobs = knobs(KnobArgs::default());
    let broken = Pool::load(
        knobs.clone(),
        &Source::Bytes {
            name: "start-trap".into(),
            bytes: start_trap(),
        },
    )
    .expect("it compiles and links; only instantiation fails");
    assert!(broken.probe().await.is_err());
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let ListenAddr::Tcp(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let front = Front::new(Arc::new(broken));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(wasmpool::http::serve(
        front.clone(),
        vec![listener],
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    for _ in 0..3 {
        let r = send(addr, "GET", "/", &[], Bytes::new()).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.headers.contains_key("retry-after"));
    }
    assert!(front.pool().stats().instantiation_failures >= 3);
    // A working component swapped in (what a reload does): served at once.
    let good = Pool::load(
        knobs,
        &Source::Bytes {
            name: "good".into(),
            bytes: p2_suite(),
        },
    )
    .unwrap();
    front.swap(Arc::new(good));
    assert_eq!(send(addr, "GET", "/", &[], Bytes::new()).await.status, 200);
    let _ = tx.send(());
    server.await.unwrap();
}

/// A client that hangs up does not leave its guest running: once the
/// request's deadline passes, the instance is told and retired, for WASIp3
/// (ProxyHandler's workers) and WASIp2 (the request's own task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up() {
    for guest in [p3_suite(), p2_suite()] {
        let s = TestServer::start(
            guest,
            KnobArgs {
                request_timeout: Some(Duration::from_millis(500)),
                max_instance_reuse_count: Some(16),
                ..Default::default()
            },
        )
        .await;
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut c,
            b"GET /sleep/60000 HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(eventually(Duration::from_secs(2), || s.stats().instances_live == 1).await);
        drop(c);
        assert!(
            eventually(Duration::from_secs(3), || s.stats().instances_live == 0).await,
            "the abandoned guest kept its instance: {:?}",
            s.stats()
        );
        assert_eq!(s.get("/").await.status, 200);
        s.stop().await;
    }
}
