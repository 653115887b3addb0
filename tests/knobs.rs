//! Every knob, with a test that fails if the knob is ignored.
mod common;
use bytes::Bytes;
use common::*;
use std::time::{Duration, Instant};
use wasmpool::KnobArgs;

async fn counters(s: &TestServer, n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for _ in 0..n {
        let r = s.get("/counter").await;
        assert_eq!(r.status, 200);
        v.push(r.text());
        settle().await;
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_count_p2() {
    // Default for p2: a fresh instance per request.
    let s = TestServer::start(p2_suite(), KnobArgs::default()).await;
    assert_eq!(counters(&s, 4).await, ["1", "1", "1", "1"]);
    assert_eq!(s.stats().instances_reused, 0);
    s.stop().await;
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_instance_reuse_count: Some(128),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(counters(&s, 4).await, ["1", "2", "3", "4"]);
    assert_eq!(s.stats().instances_reused, 3);
    s.stop().await;
    // A limit of 3: the fourth request gets a fresh instance.
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_instance_reuse_count: Some(3),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(counters(&s, 5).await, ["1", "2", "3", "1", "2"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_count_p3() {
    // Default for p3: reuse up to 128.
    let s = TestServer::start(p3_suite(), KnobArgs::default()).await;
    assert_eq!(counters(&s, 4).await, ["1", "2", "3", "4"]);
    s.stop().await;
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            max_instance_reuse_count: Some(1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(counters(&s, 3).await, ["1", "1", "1"]);
    s.stop().await;
}

async fn peak_for_concurrent_sleeps(concurrent: u32) -> u64 {
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            max_instance_concurrent_reuse_count: Some(concurrent),
            ..Default::default()
        },
    )
    .await;
    // Requests arrive 25 ms apart while each sleeps 400 ms, so up to 16
    // are in flight. (In a simultaneous burst every request may find no
    // instance with room yet, and each may make one.)
    let paths = vec!["/sleep/400".to_string(); 16];
    for r in staggered(s.addr, paths, Duration::from_millis(25)).await {
        assert_eq!(r.status, 200);
    }
    let peak = s.stats().instances_peak;
    s.stop().await;
    peak
}

/// Slow (I/O-bound) requests go through the spare-capacity gate
/// (`src/engine/spare.rs`): refused instantiations hand requests back and they are
/// sent again. Every request must still be answered, and refusals must not
/// count as failures. How many instances the gate saves is a memory figure
/// and varies with the machine's load: `benches/run.sh` reports it (peak
/// instances of the I/O-bound scenario), not this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_through_the_gate_are_all_served() {
    let s = TestServer::start(p3_suite(), KnobArgs::default()).await;
    // Teach the pool that requests are slow.
    for _ in 0..12 {
        assert_eq!(s.get("/sleep/20").await.status, 200);
    }
    // 48 clients, each sending its next request as soon as it has its
    // answer (as a load generator does).
    let tasks: Vec<_> = (0..48)
        .map(|_| {
            let addr = s.addr;
            tokio::spawn(async move {
                for _ in 0..5 {
                    let r = send(addr, "GET", "/sleep/200", &[], Bytes::new()).await;
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let st = s.stats();
    s.stop().await;
    eprintln!("{st:?}");
    assert_eq!(
        (st.requests, st.responses),
        (12 + 48 * 5, 12 + 48 * 5),
        "{st:?}"
    );
    assert_eq!((st.failed, st.instantiation_failures), (0, 0), "{st:?}");
    assert!(st.instances_peak < 48, "one instance per client: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reuse_count_changes_live_instances() {
    let one = peak_for_concurrent_sleeps(1).await;
    let sixteen = peak_for_concurrent_sleeps(16).await;
    assert!(
        one >= 12,
        "one request per instance should need ~16 instances, saw {one}"
    );
    assert!(
        sixteen * 2 <= one,
        "16 per instance should need far fewer instances: {sixteen} vs {one}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instance_timeout() {
    check_idle_instance_timeout(p3_suite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instance_timeout_p2() {
    check_idle_instance_timeout(p2_suite()).await;
}

async fn check_idle_instance_timeout(guest: Vec<u8>) {
    let knobs = |idle| KnobArgs {
        idle_instance_timeout: Some(idle),
        max_instance_reuse_count: Some(128),
        ..Default::default()
    };
    let s = TestServer::start(guest.clone(), knobs(Duration::from_millis(200))).await;
    assert_eq!(s.get("/").await.status, 200);
    assert!(
        eventually(Duration::from_secs(3), || s.stats().instances_live == 0).await,
        "idle instance not dropped"
    );
    s.stop().await;
    let s = TestServer::start(guest, knobs(Duration::from_secs(30))).await;
    assert_eq!(s.get("/").await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        s.stats().instances_live,
        1,
        "idle instance dropped before its timeout"
    );
    assert_eq!(
        s.get("/counter").await.text(),
        "2",
        "the idle instance was not reused"
    );
    s.stop().await;
}

async fn check_timeout(guest: Vec<u8>) {
    let s = TestServer::start(
        guest,
        KnobArgs {
            request_timeout: Some(Duration::from_millis(500)),
            max_instance_reuse_count: Some(100),
            max_instance_concurrent_reuse_count: Some(1),
            ..Default::default()
        },
    )
    .await;
    // A busy loop is cut off: 504, in time.
    let t = Instant::now();
    let r = s.get("/busy").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    // Other requests keep working while and after it spins.
    assert_eq!(s.get("/").await.status, 200);
    settle().await;
    // A slow guest too; the timed-out instance is not reused afterwards.
    assert_eq!(s.get("/counter").await.status, 200);
    settle().await;
    let r = s.get("/sleep/3000").await;
    assert_eq!(r.status, 504);
    settle().await;
    // Had the sleeping instance been reused, its counter would be past 1.
    let r = s.get("/counter").await;
    assert_eq!(
        r.text(),
        "1",
        "an instance whose request timed out was reused"
    );
    assert!(s.stats().timeouts >= 2);
    assert!(eventually(Duration::from_secs(5), || s.stats().instances_live <= 2).await);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_p2() {
    check_timeout(p2_suite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_p3() {
    check_timeout(p3_suite()).await;
}

async fn check_trap(guest: Vec<u8>) {
    let s = TestServer::start(
        guest,
        KnobArgs {
            max_instance_reuse_count: Some(100),
            max_instance_concurrent_reuse_count: Some(1),
            // Without auto's retry on a fresh instance (tests/reuse_fallback.rs),
            // each trap counts once.
            reuse: Some(wasmpool::config::ReuseMode::Always),
            ..Default::default()
        },
    )
    .await;
    // The trap ends its instance: the next request gets a fresh one.
    assert_eq!(s.get("/counter").await.text(), "1");
    settle().await;
    assert_eq!(s.get("/trap").await.status, 500);
    settle().await;
    assert_eq!(
        s.get("/counter").await.text(),
        "1",
        "a trapped instance was reused"
    );
    settle().await;
    // A request in flight on another instance is not affected by a trap.
    let addr = s.addr;
    let slow =
        tokio::spawn(async move { send(addr, "GET", "/sleep/500", &[], Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.get("/trap").await.status, 500);
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "slept\n"));
    assert_eq!(s.stats().traps, 2);
    // Memory bomb: an error for that request, the process lives on.
    assert_eq!(s.get("/bomb").await.status, 500);
    assert_eq!(s.get("/").await.status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_p2() {
    check_trap(p2_suite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_p3() {
    check_trap(p3_suite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_memory_size() {
    for guest in [p2_suite(), p3_suite()] {
        // 4 MiB: growing by 2 MiB fits, by 6 MiB does not.
        let s = TestServer::start(
            guest.clone(),
            KnobArgs {
                max_memory_size: Some(4 << 20),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(s.get("/grow/32").await.status, 200);
        assert_eq!(s.get("/grow/96").await.status, 500);
        s.stop().await;
        let s = TestServer::start(guest, KnobArgs::default()).await;
        assert_eq!(s.get("/grow/96").await.status, 200);
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_full_queue_answers_503_at_once() {
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            max_concurrent_requests: Some(2),
            max_queued_requests: Some(0),
            ..Default::default()
        },
    )
    .await;
    let addr = s.addr;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move { send(addr, "GET", "/sleep/1000", &[], Bytes::new()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let r = s.get("/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    for t in slow {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(s.get("/").await.status, 200);
    assert_eq!(s.stats().rejected, 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_queue_wait() {
    // Queue of 1 with a short wait: the queued request gives up with 503.
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            max_concurrent_requests: Some(1),
            max_queued_requests: Some(1),
            max_queue_wait: Some(Duration::from_millis(200)),
            ..Default::default()
        },
    )
    .await;
    let addr = s.addr;
    let slow =
        tokio::spawn(async move { send(addr, "GET", "/sleep/1000", &[], Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = Instant::now();
    let r = s.get("/").await;
    assert_eq!(r.status, 503);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(180) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    assert_eq!(slow.await.unwrap().status, 200);
    s.stop().await;
    // A long enough wait: the queued request is served once the slot frees.
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            max_concurrent_requests: Some(1),
            max_queue_wait: Some(Duration::from_secs(5)),
            ..Default::default()
        },
    )
    .await;
    let addr = s.addr;
    let slow =
        tokio::spawn(async move { send(addr, "GET", "/sleep/500", &[], Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = s.get("/").await;
    assert_eq!(r.status, 200);
    assert_eq!(slow.await.unwrap().status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_connections() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_concurrent_connections: Some(1),
            ..Default::default()
        },
    )
    .await;
    // The first connection holds the only slot with a running request.
    let mut first = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    first
        .write_all(b"GET /sleep/1500 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = s.addr;
    let second = tokio::spawn(async move { send(addr, "GET", "/", &[], Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "second connection served while the first holds the only slot"
    );
    // Once its request is done the first is an idle keep-alive connection:
    // it is closed to let the waiting one in, although it stays open.
    let r = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("served once the first went idle")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        s.front
            .http_stats()
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let (text, closed) = raw_read(&mut first, Duration::from_secs(2)).await;
    assert_eq!(status_of(&text), Some(200), "{text}");
    assert!(closed, "the idle connection was closed");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_limit() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_request_body_size: Some(1024),
            ..Default::default()
        },
    )
    .await;
    let small = Bytes::from(vec![b'a'; 512]);
    let r = send(s.addr, "POST", "/echo", &[], small).await;
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with(&"a".repeat(512)));
    // Declared too large: refused before the body is read.
    let big = vec![b'b'; 4096];
    let r = send(s.addr, "POST", "/echo", &[], Bytes::from(big.clone())).await;
    assert_eq!(r.status, 413);
    // Chunked (no length declared) to a guest that answers before reading
    // the body: the head is out, so the response is cut off, never
    // completed as if the body had been whole.
    let mut chunked =
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b'c'; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (text, closed) = raw(s.addr, &chunked, Duration::from_secs(5)).await;
    assert!(closed && !text.ends_with("0\r\n\r\n"), "{text}");
    s.stop().await;
    // The p3 echo reads the whole body before answering: 413.
    let s = TestServer::start(
        p3_suite(),
        KnobArgs {
            max_request_body_size: Some(1024),
            ..Default::default()
        },
    )
    .await;
    let (text, _) = raw(s.addr, &chunked, Duration::from_secs(5)).await;
    assert_eq!(status_of(&text), Some(413), "{text}");
    assert_eq!(
        send(s.addr, "POST", "/echo", &[], Bytes::from(vec![b'd'; 1000]))
            .await
            .status,
        200
    );
    s.stop().await;
    // The same 4 KiB body passes under the default limit.
    let s = TestServer::start(p2_suite(), KnobArgs::default()).await;
    assert_eq!(
        send(s.addr, "POST", "/echo", &[], Bytes::from(big))
            .await
            .status,
        200
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_header_limits() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_request_headers: Some(10),
            max_request_header_size: Some(8 << 10),
            ..Default::default()
        },
    )
    .await;
    let mut many = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..20 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let (text, _) = raw(s.addr, &many, Duration::from_secs(5)).await;
    assert_eq!(status_of(&text), Some(431), "{text}");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "v".repeat(10 << 10)
    );
    let (text, _) = raw(s.addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&text), Some(431), "{text}");
    s.stop().await;
    // Both pass under the defaults.
    let s = TestServer::start(p2_suite(), KnobArgs::default()).await;
    let (text, _) = raw(s.addr, &many, Duration::from_millis(1000)).await;
    assert_eq!(status_of(&text), Some(200), "{text}");
    let (text, _) = raw(s.addr, big.as_bytes(), Duration::from_millis(1000)).await;
    assert_eq!(status_of(&text), Some(200), "{text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            header_read_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        },
    )
    .await;
    let t = Instant::now();
    let (_, closed) = raw(
        s.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "slow request head not cut off");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    s.stop().await;
    let s = TestServer::start(p2_suite(), KnobArgs::default()).await;
    let (_, closed) = raw(
        s.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n",
        Duration::from_secs(1),
    )
    .await;
    assert!(
        !closed,
        "connection closed before the default 10s header timeout"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_environment_comes_only_from_config() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            env: vec!["GREETING=hi there".into(), "EMPTY=".into()],
            ..Default::default()
        },
    )
    .await;
    let r = s.get("/env").await;
    assert_eq!(r.text(), "GREETING=hi there\nEMPTY=\n");
    s.stop().await;
    // SAFETY of the test: the host's environment (PATH, HOME ...) is not passed.
    let s = TestServer::start(p2_suite(), KnobArgs::default()).await;
    assert_eq!(s.get("/env").await.text(), "");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_host_are_served() {
    // HTTP/1.0 without a Host header: the guest still gets an authority.
    for guest in [p2_suite(), p3_suite()] {
        let s = TestServer::start(
            guest,
            KnobArgs {
                max_instance_reuse_count: Some(10),
                ..Default::default()
            },
        )
        .await;
        let (text, _) = raw(
            s.addr,
            b"GET /echo HTTP/1.0\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(
            text.starts_with("HTTP/1.0 200") && text.contains("GET /echo\n"),
            "{text}"
        );
        assert_eq!(s.stats().traps, 0);
        s.stop().await;
    }
}

/// Taken by tests that start many instances at once while another counts
/// the process's page faults.
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Minor page faults this process has taken.
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name: state is the 3rd field, minflt the 10th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(7).unwrap().parse().unwrap()
}

/// The automatic warm slots keep an interpreter's heap resident: a
/// component that starts with a 4 MiB memory and writes all over it (128
/// separate pages) leaves the next instance in its slot no page faults to
/// take there. Resetting only the pages written, as wasmtime's
/// `PAGEMAP_SCAN` does, released all but 32 of them, and every fresh
/// instance faulted the rest in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_slots_spare_fresh_instances_page_faults() {
    let _alone = FAULTS.lock().await;
    let s = TestServer::start(
        p2_suite_with_memory(64),
        KnobArgs {
            max_instance_reuse_count: Some(1),
            ..Default::default()
        },
    )
    .await;
    for _ in 0..20 {
        assert_eq!(s.get("/scatter").await.text(), "128");
    }
    const N: u64 = 200;
    let before = minor_faults();
    for _ in 0..N {
        assert_eq!(s.get("/scatter").await.text(), "128");
    }
    let per_request = (minor_faults() - before) as f64 / N as f64;
    assert_eq!(s.stats().instances_reused, 0);
    assert!(
        per_request < 24.0,
        "{per_request:.1} minor faults per fresh instance (96 if the slot kept only 32 pages)"
    );
    s.stop().await;
}

/// Every slot a burst used keeps its copy of the heap after the burst, not
/// only the warm slots: past what the headroom allows for, that memory is
/// counted in the memory budget, and a new instance that starts in such a
/// slot takes it back (so it still finds room).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_slots_keep_after_a_burst_counts_in_the_memory_budget() {
    let _alone = FAULTS.lock().await;
    const MIB: u64 = 1 << 20;
    // A 128 MiB budget: warm slots keep 4 MiB each, 4 of them (16 MiB) in
    // the headroom; the 4 MiB memory is copied back whole.
    let s = TestServer::start(
        p2_suite_with_memory(64),
        KnobArgs {
            max_instance_reuse_count: Some(1),
            memory_budget: Some(wasmpool::config::MemoryBudgetArg::Bytes(128 * MIB)),
            ..Default::default()
        },
    )
    .await;
    let budget = s.front.pool().budget().clone();
    let paths = vec!["/sleep/400".to_string(); 16];
    let replies = staggered(s.addr, paths, Duration::ZERO).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    assert!(s.stats().instances_peak >= 12, "{:?}", s.stats());
    // 12 or more slots keep 4 MiB each; 16 MiB of that is headroom.
    let counted = eventually(Duration::from_secs(5), || {
        budget.retained() >= 28 * MIB && budget.used() >= budget.retained()
    })
    .await;
    assert!(
        counted,
        "retained {} MiB, used {} MiB",
        budget.retained() / MIB,
        budget.used() / MIB
    );
    // Bodies see it: what is left of the budget is less by that much.
    let room = budget.limit() - budget.used();
    assert!(!budget.try_reserve(room + 1));
    // A new instance takes a slot back, and the count follows.
    let before = budget.retained();
    for _ in 0..8 {
        assert_eq!(s.get("/").await.status, 200);
    }
    assert!(budget.retained() <= before);
    s.stop().await;
    // The pool is gone: so is what its slots kept.
    assert!(
        eventually(Duration::from_secs(5), || budget.retained() == 0).await,
        "retained {} after the pool ended",
        budget.retained()
    );
}

/// Memory kept resident between instances is zeroed: a fresh instance in a
/// slot that served before sees none of its predecessor's data, whether the
/// byte lies in the part kept resident or in the part given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_keep_resident_starts_instances_clean() {
    // `None`: automatic (the pages written are reset, or for a memory that
    // starts at 4 MiB, up to 16 MiB of it).
    let cases = [
        (2, None),
        (64, None),
        (2, Some(0)),
        (2, Some(64 << 10)),
        (2, Some(1 << 20)),
    ];
    for (pages, keep) in cases {
        let s = TestServer::start(
            p2_suite_with_memory(pages),
            KnobArgs {
                memory_keep_resident: keep,
                ..Default::default()
            },
        )
        .await;
        for _ in 0..6 {
            let stain = s.get("/stain").await.text();
            assert_eq!(stain, "0", "{pages} pages, keep {keep:?}");
        }
        s.stop().await;
    }
    // The same instance does see its own writes (the probe works).
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_instance_reuse_count: Some(8),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.get("/stain").await.text(), "0");
    assert_eq!(s.get("/stain").await.text(), "1");
    s.stop().await;
}

/// The start-up probe keeps its WASIp2 instance for the first request, but
/// a probe called again (a host checking its handler, a benchmark) does
/// not pile instances up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probing_again_keeps_one_instance_waiting() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_instance_reuse_count: Some(1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s.stats().instances_live, 1, "the probe's instance waits");
    for _ in 0..50 {
        s.front.pool().probe().await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || s.stats().instances_live == 1).await,
        "{:?}",
        s.stats()
    );
    assert_eq!(s.get("/").await.status, 200);
    assert_eq!(s.stats().instances_reused, 0);
    s.stop().await;
}
