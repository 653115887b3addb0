//! Hostile and heavy clients: each defence against the attack it stops
//! (slow bodies, slow readers, idle and silent connections, one client
//! taking every slot, guests together holding too much memory). The
//! attacks with real tools (slowhttptest) and the memory storm in a
//! memory cgroup are in tests/attacks.rs.
mod common;
use bytes::Bytes;
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmpool::KnobArgs;

/// A TCP connection to `addr` from the loopback address `from` (any
/// 127.0.0.0/8 address is local on Linux), with a receive buffer of
/// `rcvbuf` bytes when given (a slow reader's small window).
async fn connect_from(from: &str, addr: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    s.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.set_nonblocking(true).unwrap();
    let s = tokio::net::TcpSocket::from_std_stream(s.into());
    s.connect(addr).await.unwrap()
}

/// `GET path` on a new connection from `from`: the status, or `None` when
/// no complete answer came within `within`.
async fn get_from(from: &str, addr: SocketAddr, path: &str, within: Duration) -> Option<u16> {
    let mut s = connect_from(from, addr, None).await;
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let (text, closed) = raw_read(&mut s, within).await;
    if !closed {
        return None;
    }
    status_of(&text)
}

fn stat(
    s: &TestServer,
    f: impl Fn(&wasmpool::http::HttpStats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    f(s.front.http_stats()).load(Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_holds_no_slot_meanwhile() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            client_body_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        },
    )
    .await;
    // (The instance made at start-up waits idle for the first request.)
    let idle = s.stats().instances_live;
    // A body below the read-ahead buffer that stops arriving.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10000\r\n\r\n0123456789")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = s.stats();
    assert_eq!(
        (st.in_flight, st.instances_live),
        (0, idle),
        "waiting for a body holds nothing"
    );
    let t = Instant::now();
    let (text, closed) = raw_read(&mut c, Duration::from_secs(5)).await;
    assert_eq!(status_of(&text), Some(408), "{text}");
    assert!(
        closed && t.elapsed() < Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(stat(&s, |h| &h.body_timeouts), 1);
    assert_eq!(s.stats().requests, 0, "never reached the pool");

    // A body that keeps trickling in below client-body-min-rate is cut
    // too, although no pause reaches the timeout.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10000\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if c.write_all(b"0123456789").await.is_err() {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
    };
    trickle.await;
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "cut after {:?}",
        t.elapsed()
    );
    assert_eq!(stat(&s, |h| &h.body_timeouts), 2);

    // A body larger than the buffer streams to the guest; stalling it
    // there ends the request with 408 as well.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n")
        .await
        .unwrap();
    c.write_all(&[b'a'; 70_000]).await.unwrap();
    let (text, closed) = raw_read(&mut c, Duration::from_secs(5)).await;
    assert!(closed, "{text}");
    assert_eq!(stat(&s, |h| &h.body_timeouts), 3);

    // Everyone else is served throughout.
    assert_eq!(s.get("/").await.status, 200);
    let r = send(
        s.addr,
        "POST",
        "/echo",
        &[],
        Bytes::from_static(b"whole body"),
    )
    .await;
    assert!(r.text().ends_with("whole body"), "{}", r.text());
    s.stop().await;
}

/// A client that sends a large request to the echo route and then never
/// reads the answer; the connection lives as long as the returned task.
async fn stalled_reader(addr: SocketAddr, body: usize) -> tokio::task::JoinHandle<()> {
    let mut c = connect_from("127.0.0.1", addr, Some(4096)).await;
    let head = format!("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {body}\r\n\r\n");
    c.write_all(head.as_bytes()).await.unwrap();
    let (r, mut w) = c.into_split();
    // The server stops reading once its answer cannot be written: the
    // upload stalls too, so it runs on its own task.
    tokio::spawn(async move {
        let _unread = r;
        let chunk = vec![b'x'; 64 << 10];
        let mut left = body;
        while left > 0 {
            let n = left.min(chunk.len());
            if w.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        std::future::pending::<()>().await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_free_their_slots_within_the_send_timeout() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_concurrent_requests: Some(4),
            request_timeout: Some(Duration::from_secs(3)),
            send_timeout: Some(Duration::from_secs(1)),
            max_queue_wait: Some(Duration::from_millis(100)),
            ..Default::default()
        },
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(stalled_reader(s.addr, 4 << 20).await);
    }
    assert!(
        eventually(Duration::from_secs(5), || s.stats().in_flight == 4).await,
        "the four uploads are running: {:?}",
        s.stats()
    );
    let full = Instant::now();
    assert_eq!(s.get("/").await.status, 503, "every slot is held");
    // Within the send timeout (plus the time to notice) others are served.
    let served_at = loop {
        if s.get("/").await.status == 200 {
            break full.elapsed();
        }
        assert!(
            full.elapsed() < Duration::from_secs(6),
            "still refused: {:?}",
            s.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(served_at < Duration::from_secs(3), "{served_at:?}");
    // The first send timeout frees a slot; the others follow within the
    // time the four stalls started apart.
    assert!(
        eventually(Duration::from_secs(2), || stat(&s, |h| &h.send_timeouts)
            >= 4)
        .await,
        "{:?}",
        s.stats()
    );
    assert!(eventually(Duration::from_secs(3), || s.stats().in_flight == 0).await);
    for h in held {
        h.abort();
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_takes_a_few_bytes_at_a_time_is_cut_by_the_min_rate() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            send_timeout: Some(Duration::from_secs(1)),
            send_min_rate: Some(64 << 10),
            ..Default::default()
        },
    )
    .await;
    let mut c = connect_from("127.0.0.1", s.addr, Some(4096)).await;
    // More than the kernel's send buffer holds (up to 4 MiB): the server
    // itself waits on the reader.
    let body = 12 << 20;
    let head = format!("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {body}\r\n\r\n");
    c.write_all(head.as_bytes()).await.unwrap();
    let (mut r, mut w) = c.into_split();
    tokio::spawn(async move {
        let _ = w.write_all(&vec![b'y'; body]).await;
        std::future::pending::<()>().await;
    });
    // Progress, but about 2 KB/s: never a pause of a whole second.
    let t = Instant::now();
    let mut buf = [0u8; 200];
    let mut got = 0;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(1), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got += n,
            Err(_) => {}
        }
        if t.elapsed() > Duration::from_secs(15) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        closed,
        "still open after {:?} ({got} bytes read)",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(got > 0, "the reader did make progress");
    assert_eq!(stat(&s, |h| &h.send_timeouts), 1);
    s.stop().await;
}

/// An HTTP/2 connection to `addr` whose streams start with a window of
/// `window` bytes; the client reads every frame the server sends (its
/// socket never fills) and opens a stream's window only as that stream's
/// body is read.
async fn h2_client(
    addr: SocketAddr,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

fn h2_request(
    method: &str,
    path: &str,
    body: Bytes,
) -> hyper::Request<http_body_util::Full<Bytes>> {
    hyper::Request::builder()
        .method(method)
        .uri(format!("http://x{path}"))
        .body(http_body_util::Full::new(body))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_whose_window_stays_shut_free_their_guests_and_end_at_the_send_timeout() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_concurrent_requests: Some(4),
            request_timeout: Some(Duration::from_secs(30)),
            send_timeout: Some(Duration::from_secs(3)),
            max_queue_wait: Some(Duration::from_millis(100)),
            max_request_body_size: Some(8 << 10),
            ..Default::default()
        },
    )
    .await;
    // Window 0 and never a WINDOW_UPDATE: the heads arrive (they are not
    // flow-controlled), no byte of any body can.
    let (mut sender, conn) = h2_client(s.addr, 0).await;
    // The server's own answers are watched too: a 413 alone on its
    // connection.
    let (mut refused, refused_conn) = h2_client(s.addr, 0).await;
    let r = refused
        .send_request(h2_request(
            "POST",
            "/echo",
            Bytes::from(vec![b'z'; 16 << 10]),
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..4 {
        let r = sender
            .send_request(h2_request("POST", "/echo", Bytes::from(vec![b'z'; 4096])))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    // The answers are read ahead into the response buffer: the guests
    // finish and their slots are free long before the send timeout.
    assert!(
        eventually(Duration::from_millis(1500), || s.stats().in_flight == 0).await,
        "the stalled streams still hold their slots: {:?}",
        s.stats()
    );
    assert_eq!(s.get("/").await.status, 200);
    assert_eq!(stat(&s, |h| &h.send_timeouts), 0);
    // At the send timeout (checked every send-timeout/8) the connection
    // closes.
    let ended = tokio::time::timeout(Duration::from_secs(8), conn).await;
    let took = started.elapsed();
    assert!(ended.is_ok(), "the connection is still open after {took:?}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(2), refused_conn).await;
    assert!(
        ended.is_ok(),
        "the 413's connection is still open: {} send timeouts",
        stat(&s, |h| &h.send_timeouts)
    );
    assert_eq!(stat(&s, |h| &h.send_timeouts), 2);
    drop((held, r));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_http2_reader_of_a_large_answer_is_not_cut() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            send_timeout: Some(Duration::from_secs(1)),
            response_buffer_size: Some(64 << 10),
            ..Default::default()
        },
    )
    .await;
    // A 16 KiB window, reopened as the client reads at 128 KiB/s (half
    // a window, 8 KiB, is what h2 waits for before a WINDOW_UPDATE):
    // 512 KiB take about 4 s, far longer than the send timeout, yet the
    // stream never waits as long as one for room.
    let (mut sender, conn) = h2_client(s.addr, 16 << 10).await;
    let sent = 512 << 10;
    let r = sender
        .send_request(h2_request("POST", "/echo", Bytes::from(vec![b'q'; sent])))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.into_body();
    let t = Instant::now();
    let (mut got, mut qs) = (0, 0);
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let frame = frame.unwrap_or_else(|e| {
            panic!(
                "the stream was cut after {got} bytes, {:?}: {e}",
                t.elapsed()
            )
        });
        if let Some(d) = frame.data_ref() {
            got += d.len();
            qs += d.iter().filter(|b| **b == b'q').count();
            let due = Duration::from_secs_f64(got as f64 / (128 << 10) as f64);
            tokio::time::sleep(due.saturating_sub(t.elapsed())).await;
        }
    }
    assert!(t.elapsed() > Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(qs, sent, "the whole body came back ({got} bytes in all)");
    assert_eq!(stat(&s, |h| &h.send_timeouts), 0);
    drop(sender);
    let _ = conn.await;
    s.stop().await;
}

/// `GET /` on an open connection: the status of the answer's first read.
async fn get_on(c: &mut TcpStream) -> Option<u16> {
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = c.read(&mut buf).await.unwrap();
    status_of(&String::from_utf8_lossy(&buf[..n]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_after_their_own_timeout() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            keepalive_timeout: Some(Duration::from_millis(800)),
            header_read_timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        },
    )
    .await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = c.read(&mut buf).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), Some(200));
    let t = Instant::now();
    let (_, closed) = raw_read(&mut c, Duration::from_secs(5)).await;
    assert!(closed);
    let idle = t.elapsed();
    assert!(
        idle > Duration::from_millis(600) && idle < Duration::from_secs(3),
        "{idle:?}"
    );
    assert_eq!(stat(&s, |h| &h.keepalive_closes), 1);
    s.stop().await;

    // A long keep-alive with a short head timeout: idle is fine, but a
    // head started after the idle time must still arrive in time.
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            keepalive_timeout: Some(Duration::from_secs(30)),
            header_read_timeout: Some(Duration::from_millis(800)),
            ..Default::default()
        },
    )
    .await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let n = c.read(&mut buf).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), Some(200));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        get_on(&mut c).await,
        Some(200),
        "idle beyond the head timeout is fine"
    );
    c.write_all(b"GET / HT").await.unwrap();
    let t = Instant::now();
    let (_, closed) = raw_read(&mut c, Duration::from_secs(5)).await;
    assert!(
        closed && t.elapsed() < Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(stat(&s, |h| &h.header_timeouts), 1);

    // A request body's bytes are not a head: idle after a POST is idle.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (got, closed) = raw_read(&mut c, Duration::from_millis(300)).await;
    assert!(status_of(&got) == Some(200) && !closed, "{got}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        get_on(&mut c).await,
        Some(200),
        "idle after a request body is keep-alive, not a head"
    );

    // The next head begins while a request still runs (as a client may
    // send it before the response's last bytes): once that request ends,
    // the rest of the head is timed from its first bytes, not as idle.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /sleep/300 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(b"GET / HT").await.unwrap();
    let t = Instant::now();
    let (got, closed) = raw_read(&mut c, Duration::from_secs(5)).await;
    assert_eq!(status_of(&got), Some(200), "{got}");
    assert!(
        closed && t.elapsed() < Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(stat(&s, |h| &h.header_timeouts), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_its_share_leaves_room_for_another() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_concurrent_connections: Some(20),
            max_connections_per_client: Some(3),
            ..Default::default()
        },
    )
    .await;
    // 127.0.0.1 holds three busy connections.
    let mut busy = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.0.1", s.addr, None).await;
        c.write_all(b"GET /sleep/1500 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        busy.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Its fourth is answered 429 and closed; another address is served.
    assert_eq!(
        get_from("127.0.0.1", s.addr, "/", Duration::from_secs(5)).await,
        Some(429)
    );
    assert_eq!(
        get_from("127.0.0.2", s.addr, "/", Duration::from_secs(5)).await,
        Some(200)
    );
    assert_eq!(stat(&s, |h| &h.refused_per_client), 1);
    for mut c in busy {
        let (text, _) = raw_read(&mut c, Duration::from_millis(2500)).await;
        assert_eq!(status_of(&text), Some(200), "{text}");
    }
    s.stop().await;

    // Requests in flight per client: one more waits for a place, at most
    // max-queue-wait, then gets 429.
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_concurrent_requests: Some(20),
            max_requests_per_client: Some(2),
            max_queue_wait: Some(Duration::from_millis(200)),
            ..Default::default()
        },
    )
    .await;
    let addr = s.addr;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                get_from("127.0.0.1", addr, "/sleep/1000", Duration::from_secs(5)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get_from("127.0.0.1", addr, "/", Duration::from_secs(5)).await,
        Some(429)
    );
    assert_eq!(
        get_from("127.0.0.2", addr, "/", Duration::from_secs(5)).await,
        Some(200)
    );
    for t in slow {
        assert_eq!(t.await.unwrap(), Some(200));
    }
    assert_eq!(
        get_from("127.0.0.1", addr, "/", Duration::from_secs(5)).await,
        Some(200)
    );
    assert_eq!(stat(&s, |h| &h.requests_refused_per_client), 1);
    // A third that may wait long enough is served once one ends.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                get_from("127.0.0.1", addr, "/sleep/100", Duration::from_secs(5)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        get_from("127.0.0.1", addr, "/", Duration::from_secs(5)).await,
        Some(200)
    );
    for t in slow {
        assert_eq!(t.await.unwrap(), Some(200));
    }
    assert_eq!(stat(&s, |h| &h.requests_refused_per_client), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_confines_memory_to_what_it_allows() {
    // Each /hold/16 instance holds its stack (2 MiB) and 2 + 16 pages of
    // memory (1152 KiB) for a second; the budget fits three and a bit.
    let per = 2048 + 1152;
    let budget = 3 * per + 64;
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            memory_budget: Some(wasmpool::config::MemoryBudgetArg::Bytes(budget << 10)),
            max_queue_wait: Some(Duration::from_secs(5)),
            ..Default::default()
        },
    )
    .await;
    let budget_of = |s: &TestServer| s.front.pool().budget().clone();
    assert_eq!(budget_of(&s).limit(), budget << 10);
    // A guest that asks for more than the budget gets its own failure.
    assert_eq!(s.get("/grow/128").await.status, 500);
    assert_eq!(s.get("/").await.status, 200);
    assert!(budget_of(&s).refused() >= 1);
    // Three holders fill the budget; a fourth request waits for one to
    // end, then runs.
    let addr = s.addr;
    let holders: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                send(addr, "GET", "/hold/16", &[], Bytes::new())
                    .await
                    .status
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(3), || budget_of(&s).used()
            >= 3 * (per << 10))
        .await,
        "used {}",
        budget_of(&s).used()
    );
    let t = Instant::now();
    assert_eq!(s.get("/").await.status, 200);
    assert!(
        t.elapsed() > Duration::from_millis(300),
        "it waited: {:?}",
        t.elapsed()
    );
    for h in holders {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert!(eventually(Duration::from_secs(2), || budget_of(&s).used() == 0).await);
    s.stop().await;

    // With a short queue wait the answer is 503 with Retry-After instead.
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            memory_budget: Some(wasmpool::config::MemoryBudgetArg::Bytes(budget << 10)),
            max_queue_wait: Some(Duration::from_millis(100)),
            ..Default::default()
        },
    )
    .await;
    let addr = s.addr;
    let holders: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                send(addr, "GET", "/hold/16", &[], Bytes::new())
                    .await
                    .status
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(3), || budget_of(&s).used()
            >= 3 * (per << 10))
        .await
    );
    let r = s.get("/").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    for h in holders {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(s.get("/").await.status, 200);
    s.stop().await;
}
