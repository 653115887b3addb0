//! examples/hello.wasm is exactly what its sources build to, and it serves.
mod common;
use common::*;
use wasmpool::KnobArgs;

fn built() -> Vec<u8> {
    build_component(
        &root().join("examples/hello/hello.wat"),
        &root().join("examples/hello/wit"),
        "hello",
    )
}

#[test]
fn committed_binary_matches_sources() {
    let built = built();
    let path = root().join("examples/hello.wasm");
    if std::env::var_os("WASMPOOL_BLESS").is_some() {
        std::fs::write(&path, &built).unwrap();
    }
    let committed = std::fs::read(&path).expect("examples/hello.wasm exists");
    assert!(
        committed == built,
        "examples/hello.wasm is stale: rebuild it with WASMPOOL_BLESS=1 cargo test --test example_hello"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_serves() {
    let s = TestServer::start(built(), KnobArgs::default()).await;
    for _ in 0..3 {
        let r = s.get("/anything").await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "Hello from wasmpool!\n")
        );
    }
    s.stop().await;
}
