mod common;
use common::*;
use wasmpool::KnobArgs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_hello_and_echo() {
    let s = TestServer::start(p3_suite(), KnobArgs::default()).await;
    let r = s.get("/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "hello from p3\n");
    let r = send(
        s.addr,
        "PUT",
        "/echo/a?b=c",
        &[("x-test", "abc")],
        bytes::Bytes::from_static(b"the body"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.text();
    assert!(t.starts_with("PUT /echo/a?b=c\n"), "{t}");
    assert!(t.contains("x-test: abc\n"), "{t}");
    assert!(t.ends_with("\n\nthe body"), "{t}");
    let r = s.get("/sleep/50").await;
    assert_eq!((r.status, r.text().as_str()), (200, "slept\n"));
    s.stop().await;
}
