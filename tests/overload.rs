//! Overload: a bounded load of 2x and 10x `max-concurrent-requests`
//! clients. Clients see only 200s, and 503s with Retry-After; no resets,
//! no waits past the queue wait; memory stays bounded; the server recovers
//! fully when the load stops.
mod common;
use bytes::Bytes;
use common::*;
use std::time::{Duration, Instant};
use wasmpool::KnobArgs;

const MAX: u32 = 4;
const QUEUE_WAIT: Duration = Duration::from_millis(200);
const WORK: Duration = Duration::from_millis(50);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    busy: u64,
    busy_without_retry_after: u64,
    other: Vec<String>,
    slowest: Duration,
}

async fn load(s: &TestServer, clients: u32, for_: Duration) -> Tally {
    let addr = s.addr;
    let end = Instant::now() + for_;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            while Instant::now() < end {
                let started = Instant::now();
                let path = format!("/sleep/{}", WORK.as_millis());
                match try_send(addr, "GET", &path, &[], Bytes::new()).await {
                    Ok(r) if r.status == 200 => t.ok += 1,
                    Ok(r) if r.status == 503 => {
                        t.busy += 1;
                        if !r.headers.contains_key("retry-after") {
                            t.busy_without_retry_after += 1;
                        }
                    }
                    Ok(r) => t.other.push(format!("{} {}", r.status, r.text())),
                    Err(e) => t.other.push(e),
                }
                t.slowest = t.slowest.max(started.elapsed());
            }
            t
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.unwrap();
        all.ok += t.ok;
        all.busy += t.busy;
        all.busy_without_retry_after += t.busy_without_retry_after;
        all.other.extend(t.other);
        all.slowest = all.slowest.max(t.slowest);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_200_or_503_and_recovers() {
    let s = TestServer::start(
        p2_suite(),
        KnobArgs {
            max_concurrent_requests: Some(MAX),
            max_queued_requests: Some(MAX),
            max_queue_wait: Some(QUEUE_WAIT),
            max_instance_reuse_count: Some(128),
            ..Default::default()
        },
    )
    .await;
    // Warm-up, then the baseline memory.
    load(&s, MAX, Duration::from_millis(500)).await;
    let rss_before = rss_kib();
    for factor in [2, 10] {
        let t = load(&s, MAX * factor, Duration::from_secs(3)).await;
        eprintln!("{factor}x: {t:?}");
        assert!(
            t.other.is_empty(),
            "{factor}x: unexpected outcomes {:?}",
            t.other
        );
        assert_eq!(
            t.busy_without_retry_after, 0,
            "{factor}x: 503 without Retry-After"
        );
        assert!(t.ok > 0, "{factor}x: nothing served");
        if factor == 10 {
            assert!(t.busy > 0, "10x load never hit backpressure");
        }
        // Admitted: the queue wait, then the work; refused: at most the
        // queue wait. Generous slack for a loaded 2-core machine.
        let bound = QUEUE_WAIT + WORK + Duration::from_secs(2);
        assert!(
            t.slowest < bound,
            "{factor}x: a request took {:?}",
            t.slowest
        );
    }
    let rss_after = rss_kib();
    eprintln!("RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 200 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Recovery: idle again, every request served.
    assert!(
        eventually(Duration::from_secs(5), || {
            let st = s.stats();
            st.in_flight == 0 && st.queued == 0
        })
        .await
    );
    for _ in 0..MAX * 2 {
        assert_eq!(s.get("/").await.status, 200);
    }
    s.stop().await;
}
