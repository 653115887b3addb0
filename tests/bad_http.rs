//! Hostile and malformed HTTP against a running server: each gets a clear
//! refusal (or the connection closed), and the server keeps serving.
//! Header size/count limits (431), the header read timeout and the body
//! limit (413) are in tests/knobs.rs; here are the cases around them.
mod common;
use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmpool::KnobArgs;

async fn server() -> TestServer {
    TestServer::start(
        p2_suite(),
        KnobArgs {
            header_read_timeout: Some(Duration::from_millis(800)),
            max_request_body_size: Some(1024),
            ..Default::default()
        },
    )
    .await
}

/// Sends `data`, returns (what came back, whether the server closed).
async fn exchange(s: &TestServer, data: &[u8]) -> (String, bool) {
    raw(s.addr, data, Duration::from_secs(5)).await
}

async fn still_serves(s: &TestServer) {
    assert_eq!(s.get("/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_lines_get_400() {
    let s = server().await;
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\nhost: x\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nbad header name: y\r\n\r\n",
        b"G\0T / HTTP/1.1\r\nhost: x\r\n\r\n",
    ] {
        let (text, closed) = exchange(&s, bad).await;
        assert_eq!(
            status_of(&text),
            Some(400),
            "{:?}: {text}",
            String::from_utf8_lossy(bad)
        );
        assert!(closed, "{:?}", String::from_utf8_lossy(bad));
    }
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_patterns_are_refused() {
    let s = server().await;
    // Content-Length and Transfer-Encoding together: hyper lets chunked
    // framing win and closes the connection after the response (RFC 9112
    // 6.3), so what was smuggled behind the body is never read.
    let (text, closed) = exchange(
        &s,
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /trap HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert!(closed, "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    for bad in [
        // Two different Content-Length values.
        &b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ncontent-length: 40\r\n\r\nabcd"[..],
        // A Transfer-Encoding that is not (finally) chunked.
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\nabcd",
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        // A bad chunk size.
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n",
    ] {
        let (text, closed) = exchange(&s, bad).await;
        let what = String::from_utf8_lossy(bad);
        // Refused with 400; or, for a bad chunk found after the guest began
        // its answer, the answer is cut off (no last chunk) rather than
        // ending as if complete.
        let status = status_of(&text);
        let cut = status == Some(200) && !text.ends_with("\r\n0\r\n\r\n");
        assert!(
            status == Some(400) || cut || (status.is_none() && closed),
            "{what:?} was not refused: {text}"
        );
        assert!(closed, "{what:?}: connection left open");
        // Nothing smuggled behind it was answered.
        assert!(text.matches("HTTP/1.1 ").count() <= 1, "{text}");
    }
    assert_eq!(s.stats().traps, 0, "a smuggled request reached the guest");
    // Equal Content-Length values agree on the framing (RFC 9110 8.6 lets
    // a recipient take them as one): the body is 4 bytes, and what follows
    // is the next request on the connection, for every reader alike.
    let (text, _) = exchange(
        &s,
        b"POST /echo/a HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ncontent-length: 4\r\n\r\nabcdGET /echo/b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    let (a, b) = (text.find("/echo/a").unwrap(), text.find("/echo/b").unwrap());
    assert!(a < b, "{text}");
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let s = server().await;
    let mut req = Vec::new();
    for i in 0..5 {
        req.extend_from_slice(format!("GET /echo/{i} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes());
    }
    req.extend_from_slice(b"GET /echo/last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let (text, closed) = exchange(&s, &req).await;
    assert!(closed);
    let mut at = 0;
    for i in ["0", "1", "2", "3", "4", "last"] {
        // (The echo is chunked: the path is one chunk of it.)
        let needle = format!("/echo/{i}");
        let found = text[at..]
            .find(&needle)
            .unwrap_or_else(|| panic!("{needle:?} missing or out of order in:\n{text}"));
        at += found + needle.len();
    }
    assert_eq!(text.matches("HTTP/1.1 200").count(), 6, "{text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_at_the_header_read_timeout() {
    let s = server().await;
    // A byte of header every 100 ms: progress, but the head is never done.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let t = Instant::now();
    let mut closed_after = None;
    for _ in 0..60 {
        if c.write_all(b"x").await.is_err() {
            closed_after = Some(t.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_after = Some(t.elapsed());
                break;
            }
            _ => {}
        }
    }
    let after = closed_after.expect("a trickling request head was never cut off");
    assert!(
        after >= Duration::from_millis(600) && after < Duration::from_secs(3),
        "cut off after {after:?} (header read timeout 800ms)"
    );
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused_without_reading_it() {
    let s = server().await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // Declares 10 MB (limit 1 KiB), sends 100 bytes and waits.
    c.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n")
        .await
        .unwrap();
    c.write_all(&[b'a'; 100]).await.unwrap();
    let mut out = Vec::new();
    let t = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&text), Some(413), "{text}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    still_serves(&s).await;
    s.stop().await;
}
