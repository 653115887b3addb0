//! Guests from a real toolchain: componentize-py, WASIp2 and WASIp3.
mod common;
use bytes::Bytes;
use common::*;
use std::sync::OnceLock;
use std::time::Duration;
use wasmpool::KnobArgs;

fn p2() -> Vec<u8> {
    static G: OnceLock<Vec<u8>> = OnceLock::new();
    G.get_or_init(|| python_guest("p2")).clone()
}

fn p3() -> Vec<u8> {
    static G: OnceLock<Vec<u8>> = OnceLock::new();
    G.get_or_init(|| python_guest("p3")).clone()
}

fn args(a: KnobArgs) -> KnobArgs {
    KnobArgs {
        cache_dir: Some(shared_cache()),
        ..a
    }
}

/// A loopback upstream that answers 204 to everything.
async fn upstream() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { break };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(204)
                            .body(http_body_util::Empty::<Bytes>::new())
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_p2_reuse_env_and_outbound_policy() {
    let guest = p2();
    // Default p2: fresh instance per request.
    let s = TestServer::start(guest.clone(), args(KnobArgs::default())).await;
    assert_eq!(s.get("/").await.text(), "hello from python p2\n");
    assert_eq!(s.get("/counter").await.text(), "1");
    assert_eq!(s.get("/counter").await.text(), "1");
    // No environment by default; outgoing HTTP refused by default.
    let env = s.get("/env").await.text();
    assert!(!env.contains("PATH=") && !env.contains("HOME="), "{env}");
    let up = upstream().await;
    let r = s.get(&format!("/fetch/{}", up.port())).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("HttpRequestDenied"), "{}", r.text());
    s.stop().await;

    let s = TestServer::start(
        guest.clone(),
        args(KnobArgs {
            max_instance_reuse_count: Some(128),
            env: vec!["GREETING=hi".into()],
            allow_outbound: vec![format!("127.0.0.1:{}", up.port())],
            ..Default::default()
        }),
    )
    .await;
    let counts: Vec<String> = futures_seq(&s, "/counter", 3).await;
    assert_eq!(counts, ["1", "2", "3"]);
    assert!(s.get("/env").await.text().contains("GREETING=hi\n"));
    let r = s.get(&format!("/fetch/{}", up.port())).await;
    assert_eq!((r.status, r.text().as_str()), (200, "upstream 204"));
    // The rule names a port: the same host on another port stays refused.
    let other = upstream().await;
    let r = s.get(&format!("/fetch/{}", other.port())).await;
    assert_eq!(r.status, 502, "{}", r.text());
    s.stop().await;
}

async fn futures_seq(s: &TestServer, path: &str, n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(s.get(path).await.text());
        // Let the instance become available again (see knobs.rs `settle`).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_p3_reuse_and_concurrency() {
    let guest = p3();
    let s = TestServer::start(guest.clone(), args(KnobArgs::default())).await;
    assert_eq!(s.get("/").await.text(), "hello from python p3\n");
    // Default p3 reuse: the counter climbs on one instance.
    let c1: u32 = s.get("/counter").await.text().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c2: u32 = s.get("/counter").await.text().parse().unwrap();
    assert!(c2 > c1, "{c1} {c2}");
    // Concurrent sleeps share instances. They start 30 ms apart: the
    // handler gives a request to an instance whose event loop is waiting
    // (here, on an earlier sleep), and a burst of 8 at the same instant on a
    // loaded machine can find every loop busy for that instant.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            send(addr, "GET", "/sleep/300", &[], Bytes::new()).await
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "slept\n"));
    }
    assert!(
        s.stats().instances_peak < 8,
        "peak {}",
        s.stats().instances_peak
    );
    s.stop().await;
    let s = TestServer::start(
        guest,
        args(KnobArgs {
            max_instance_reuse_count: Some(1),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(futures_seq(&s, "/counter", 2).await, ["1", "1"]);
    assert!(eventually(Duration::from_secs(5), || s.stats().instances_live == 0).await);
    s.stop().await;
}
