mod common;
use common::*;
use wasmpool::KnobArgs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_hello_and_echo() {
    let s = TestServer::start(p2_suite(), KnobArgs::default()).await;
    let r = s.get("/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from p2\n");
    let r = send(
        s.addr,
        "POST",
        "/echo?x=1",
        &[("x-test", "abc")],
        bytes::Bytes::from_static(b"the body"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.text();
    assert!(t.starts_with("POST /echo?x=1\n"), "{t}");
    assert!(t.contains("x-test: abc\n"), "{t}");
    assert!(t.ends_with("\n\nthe body"), "{t}");
    s.stop().await;
}

/// A body too large for the response channel makes the guest answer before
/// `handle` returns: the rest of the call runs on after the head went out,
/// and the instance still comes back for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_streamed_answer_then_reuse() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_instance_reuse_count: Some(128),
            ..Default::default()
        },
    )
    .await;
    let body: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let r = send(
        s.addr,
        "POST",
        "/echo",
        &[],
        bytes::Bytes::from(body.clone()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.ends_with(&body),
        "echoed body differs ({} bytes)",
        r.body.len()
    );
    assert!(
        eventually(std::time::Duration::from_secs(3), || s
            .stats()
            .instances_live
            == 1)
        .await,
        "the instance was not kept: {:?}",
        s.stats()
    );
    assert_eq!(s.get("/").await.status, 200);
    let st = s.stats();
    assert_eq!(
        (st.instances_created, st.instances_reused),
        (1, 1),
        "{st:?}"
    );
    s.stop().await;
}

/// The guest's trailers reach the client: over HTTP/1.1 on a chunked
/// response (the client says `TE: trailers`, the guest declared them in
/// `Trailer`), and over HTTP/2 as a trailing HEADERS frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_trailers_over_http1_and_http2() {
    use http_body_util::{BodyExt, Full};
    let s = TestServer::start(p2_suite(), KnobArgs::default()).await;
    let req = || {
        http::Request::builder()
            .uri("/trailers")
            .header("host", "localhost")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let io = || async {
        hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(s.addr).await.unwrap())
    };
    let (mut h1, conn) = hyper::client::conn::http1::handshake(io().await)
        .await
        .unwrap();
    tokio::spawn(conn);
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io().await)
            .await
            .unwrap();
    tokio::spawn(conn);
    for (name, resp) in [
        ("HTTP/1.1", h1.send_request(req()).await.unwrap()),
        ("HTTP/2", h2.send_request(req()).await.unwrap()),
    ] {
        assert_eq!(resp.status(), 200, "{name}");
        let got = resp.into_body().collect().await.unwrap();
        let trailers = got.trailers().cloned();
        assert_eq!(&got.to_bytes()[..], b"with trailers\n", "{name}");
        let trailers = trailers.unwrap_or_else(|| panic!("{name}: no trailers"));
        assert_eq!(trailers["x-checksum"], "c0ffee", "{name}");
    }
    s.stop().await;
}
