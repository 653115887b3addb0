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
