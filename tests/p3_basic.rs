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

/// `n` requests for `/sleep/{ms}`, `gap` apart, all in flight together;
/// returns how many instances served them.
async fn instances_for_staggered_sleeps(concurrent: u32, n: usize, ms: u64, gap: u64) -> u64 {
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            max_instance_concurrent_reuse_count: Some(concurrent),
            ..Default::default()
        },
    )
    .await;
    // One instance made and idle first: the first sleeper takes it, so
    // nothing depends on how long instantiation takes on a loaded machine.
    assert_eq!(s.get("/").await.status, 200);
    settle().await;
    let paths = (0..n as u64)
        .map(|i| format!("/sleep/{}", ms - i * gap))
        .collect();
    for r in staggered(s.addr, paths, std::time::Duration::from_millis(gap)).await {
        assert_eq!((r.status, r.text().as_str()), (200, "slept\n"));
    }
    let st = s.stats();
    s.stop().await;
    assert_eq!((st.responses, st.failed), (n as u64 + 1, 0), "{st:?}");
    st.instances_created
}

/// The WASIp3 dispatcher (src/engine/p3.rs) sends a request to a live
/// instance that has room for one more before it makes a new one: requests
/// arriving while the first one waits on its timer all join its instance.
/// With one request per instance, each needs its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_join_a_live_instance_with_room_before_a_new_one_is_made() {
    assert_eq!(instances_for_staggered_sleeps(16, 6, 800, 60).await, 1);
    assert_eq!(instances_for_staggered_sleeps(1, 6, 800, 60).await, 6);
    // The limit holds: 4 at a time make 2 instances for 6 requests.
    assert_eq!(instances_for_staggered_sleeps(4, 6, 800, 60).await, 2);
}

/// A readiness check answered at once does not open the instantiation
/// gate (src/engine/spare.rs) for a burst of slow requests right behind
/// it: 48 requests that sleep arrive together and share a few instances
/// (16 requests each) instead of making one each. (It took one fast
/// answer to open the gate: 16 to 33 instances for 64 such requests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_readiness_check_leaves_the_gate_on_for_a_slow_burst() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = TestServer::start(p3_suite(), KnobArgs::default()).await;
    assert_eq!(s.get("/").await.status, 200);
    settle().await;
    // Connected first, then the requests all written at once (as 48
    // clients of a load generator do).
    let mut conns = Vec::new();
    for _ in 0..48 {
        conns.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
    }
    for c in &mut conns {
        c.write_all(b"GET /sleep/400 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
    }
    for mut c in conns {
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.contains("slept\n"),
            "{reply}"
        );
    }
    let st = s.stats();
    s.stop().await;
    assert_eq!((st.responses, st.failed), (49, 0), "{st:?}");
    // 48 in flight and half as much room again need 5 instances of 16 (or
    // one per CPU); a few more may come from requests starved while the
    // burst is spread over them on a slow machine, not one each.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!(
        st.instances_created <= 12.max(cpus + 6),
        "{} instances for 48 requests: {st:?}",
        st.instances_created
    );
}

/// A client that sends a large body to `/echo` and reads none of the echo
/// holds its own instance's loop (its response body drives it), never
/// another request's: other requests are answered meanwhile, and the
/// server still serves once it goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_response_stalls_no_one_else() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            max_request_body_size: Some(256 << 20),
            ..Default::default()
        },
    )
    .await;
    let mut stuck = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // The suite's echo reads the whole body before it answers (into a
    // buffer that doubles, within the guest's memory limit), then writes
    // it all back: 28 MiB is more than every socket buffer between the
    // guest and a client that reads nothing can hold.
    let len = 28 << 20;
    let head = format!("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
    stuck.write_all(head.as_bytes()).await.unwrap();
    stuck.write_all(&vec![b'x'; len]).await.unwrap();
    // The echo is stuck once the buffers are full: its request stays in
    // flight.
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let st = s.stats();
    assert_eq!((st.in_flight, st.traps), (1, 0), "{st:?}");
    for path in ["/", "/sleep/20", "/counter", "/"] {
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), s.get(path))
            .await
            .unwrap_or_else(|_| panic!("{path} stalled behind the client that does not read"));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        eprintln!("{path}: {:?}", t.elapsed());
    }
    assert_eq!(s.stats().in_flight, 1, "the echo went through after all");
    drop(stuck);
    assert_eq!(s.get("/").await.text(), "hello from p3\n");
    s.stop().await;
}

/// A response that streams for longer than `request-timeout` is not cut
/// when its instance is shared: the loop then runs on a task of its own
/// and is torn down only after `request-timeout` without progress, and
/// every frame of a response body is progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_shared_instance_outlives_the_request_timeout() {
    use std::time::Duration;
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            request_timeout: Some(Duration::from_millis(500)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.get("/").await.status, 200);
    settle().await;
    // The sleeper takes the idle instance and runs its loop; the drip
    // joins it, so once the sleeper is answered the loop is on its own
    // task. The drip then streams for 2 s: 10 chunks, 200 ms apart.
    let paths = vec!["/sleep/300".to_string(), "/drip/200".to_string()];
    let t = std::time::Instant::now();
    let replies = staggered(s.addr, paths, Duration::from_millis(60)).await;
    assert_eq!(
        (replies[0].status, replies[0].text().as_str()),
        (200, "slept\n")
    );
    assert_eq!(replies[1].status, 200);
    assert_eq!(replies[1].text(), "drip\n".repeat(10), "the stream was cut");
    assert!(
        t.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
    let st = s.stats();
    assert_eq!(
        (st.instances_created, st.failed),
        (1, 0),
        "the drip did not share the sleeper's instance: {st:?}"
    );
    // The instance was not torn down as stuck: it serves again.
    assert_eq!(s.get("/counter").await.text(), "4");
    assert_eq!(s.stats().instances_created, 1);
    s.stop().await;
}

/// The other side of the test above: a loop on its own task whose guest
/// produces nothing for longer than the request timeout is torn down. The
/// stream is cut (not ended as if complete), and the instance is not used
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_loop_that_makes_no_progress_is_torn_down() {
    use std::time::Duration;
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            request_timeout: Some(Duration::from_millis(500)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.get("/").await.status, 200);
    settle().await;
    // As above, but the drips are 5 s apart: after the first one the loop
    // (on its own task once the sleeper is answered) makes no progress.
    let t = std::time::Instant::now();
    let sleeper = tokio::spawn({
        let addr = s.addr;
        async move { send(addr, "GET", "/sleep/300", &[], bytes::Bytes::new()).await }
    });
    tokio::time::sleep(Duration::from_millis(60)).await;
    let drip = try_send(s.addr, "GET", "/drip/5000", &[], bytes::Bytes::new()).await;
    let took = t.elapsed();
    let sleeper = sleeper.await.unwrap();
    assert_eq!((sleeper.status, sleeper.text().as_str()), (200, "slept\n"));
    assert!(
        drip.is_err(),
        "the stalled stream ended as if complete: {drip:?}"
    );
    // Cut once it made no progress for the request timeout (500 ms after
    // the first drip, plus the check's 100 ms), long before the next drip.
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let st = s.stats();
    assert_eq!(st.instances_created, 1, "{st:?}");
    assert!(
        eventually(Duration::from_secs(2), || s.stats().instances_live == 0).await,
        "the stuck instance is still live: {:?}",
        s.stats()
    );
    // The next request gets a fresh instance.
    assert_eq!(s.get("/counter").await.text(), "1");
    assert_eq!(s.stats().instances_created, 2);
    s.stop().await;
}

/// A guest that sets backpressure takes no new request until it lifts it:
/// a request that arrives meanwhile goes to another instance at once
/// instead of joining (or waiting for) the held one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_backpressure_keeps_requests_off_its_instance() {
    use std::time::Duration;
    let s = TestServer::start(p3_suite(), KnobArgs::default()).await;
    assert_eq!(s.get("/").await.status, 200);
    settle().await;
    let held = tokio::spawn({
        let addr = s.addr;
        async move { send(addr, "GET", "/hold/800", &[], bytes::Bytes::new()).await }
    });
    // The holder has the instance (and its backpressure) by now.
    assert!(eventually(Duration::from_secs(5), || s.stats().in_flight == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    let r = s.get("/counter").await;
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    // A new instance: its first request (a joiner would count 3).
    assert_eq!(r.text(), "1", "the request ran on the held instance");
    assert!(
        took < Duration::from_millis(600),
        "waited for the hold: {took:?}"
    );
    let h = held.await.unwrap();
    assert_eq!((h.status, h.text().as_str()), (200, "held\n"));
    // Lifted: the held instance takes requests again.
    let st = s.stats();
    assert_eq!((st.instances_created, st.failed), (2, 0), "{st:?}");
    s.stop().await;
}
